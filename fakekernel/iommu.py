"""The type1 IOMMU of the fake kernel: IOVA -> process vaddr, so emulated DMA touches real memory.

Mappings are kept sorted by IOVA in blocks, so that lookup, map and unmap are O(log n)
searches that move at most one block; Linux keeps an rbtree for the same reason.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
from bisect import bisect_left, bisect_right
from itertools import chain
from dataclasses import dataclass

from .err import error

PAGE_SIZE = mmap.PAGESIZE
DMA_ENTRY_LIMIT = 65535

# A refused DMA is silent on the device's side, so each one is a WARNING here, as Linux's DMAR
# fault lines are in dmesg: pytest shows it among the test's captured log.
log = logging.getLogger("fakekernel.iommu")

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


class SortedMappings:
    """DMA mappings sorted by IOVA, in blocks of at most 2 * LOAD (sortedcontainers' layout, cut
    down to what type1 asks): a lookup bisects the blocks' first IOVAs and then one block, and an
    insert or a removal shifts one block's list, not a million entries."""

    LOAD = 1000

    def __init__(self) -> None:
        self._firsts: list[int] = []
        self._starts: list[list[int]] = []
        self._maps: list[list[DMAMapping]] = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self):
        return chain.from_iterable(self._maps)

    def floor(self, iova: int) -> DMAMapping | None:
        """The mapping with the highest start at or below iova."""
        b = bisect_right(self._firsts, iova) - 1
        if b < 0:
            return None
        return self._maps[b][bisect_right(self._starts[b], iova) - 1]

    def insert(self, mapping: DMAMapping) -> None:
        if not self._firsts:
            self._firsts.append(mapping.iova)
            self._starts.append([])
            self._maps.append([])
        b = max(bisect_right(self._firsts, mapping.iova) - 1, 0)
        starts, maps = self._starts[b], self._maps[b]
        i = bisect_right(starts, mapping.iova)
        starts.insert(i, mapping.iova)
        maps.insert(i, mapping)
        self._firsts[b] = starts[0]
        self._len += 1
        if len(starts) > 2 * self.LOAD:
            self._firsts.insert(b + 1, starts[self.LOAD])
            self._starts.insert(b + 1, starts[self.LOAD:])
            self._maps.insert(b + 1, maps[self.LOAD:])
            del starts[self.LOAD:], maps[self.LOAD:]

    def remove(self, first: int, last: int) -> list[DMAMapping]:
        """Take out every mapping that starts in [first, last]."""
        removed: list[DMAMapping] = []
        b = max(bisect_right(self._firsts, first) - 1, 0)
        while b < len(self._starts):
            starts, maps = self._starts[b], self._maps[b]
            i, j = bisect_left(starts, first), bisect_right(starts, last)
            removed += maps[i:j]
            del starts[i:j], maps[i:j]
            if not starts:
                del self._firsts[b], self._starts[b], self._maps[b]
                continue
            self._firsts[b] = starts[0]
            if i < len(starts):
                break
            b += 1
        self._len -= len(removed)
        return removed

    def clear(self) -> None:
        self._firsts.clear()
        self._starts.clear()
        self._maps.clear()
        self._len = 0


@dataclass(slots=True, frozen=True)
class IOMMUFault:
    """A DMA the IOMMU refused; Linux logs a DMAR fault and the device sees an abort."""

    iova: int
    size: int
    write: bool
    reason: str


class Type1IOMMU:
    """The DMA mappings of one container, with permission checks and fault recording. `fault_log`,
    when given, collects the faults too and outlives the container (FakeKernel.iommu_faults)."""

    def __init__(self, dma_entry_limit: int = DMA_ENTRY_LIMIT, fault_log: list[IOMMUFault] | None = None):
        self._maps = SortedMappings()
        self.dma_entry_limit = dma_entry_limit
        self.faults: list[IOMMUFault] = []
        self.fault_log = fault_log

    def __len__(self) -> int:
        return len(self._maps)

    @property
    def dma_avail(self) -> int:
        return self.dma_entry_limit - len(self._maps)

    def mappings(self) -> list[DMAMapping]:
        return list(self._maps)

    def find(self, iova: int) -> DMAMapping | None:
        """The mapping containing iova."""
        m = self._maps.floor(iova)
        return m if m is not None and iova < m.end else None

    def overlaps(self, iova: int, size: int) -> bool:
        m = self._maps.floor(iova + size - 1)
        return m is not None and m.end > iova

    def map(self, iova: int, size: int, vaddr: int, readable: bool, writable: bool, pin: bool = True) -> None:
        """Checks come in type1's order: overlap, then the entry limit, then pinning (which only
        a container with an IOMMU domain does at map time)."""
        if self.overlaps(iova, size):
            raise error(errno.EEXIST, "DMA mapping overlaps an existing one")
        if not self.dma_avail:
            raise error(errno.ENOSPC, "dma_entry_limit reached")
        if pin and (not user_range_mapped(vaddr, size) or (writable and not user_range_writable(vaddr, size))):
            raise error(errno.EFAULT, "vaddr is not mapped in the process, or not writable for a WRITE mapping")
        self._maps.insert(DMAMapping(iova, size, vaddr, readable, writable))

    def first_partial(self, iova: int, size: int) -> bool:
        """Whether [iova, iova+size) cuts a mapping in two at either end (type1v2 refuses that)."""
        m = self.find(iova)
        if m is not None and m.iova != iova:
            return True
        last = iova + size - 1
        m = self.find(last)
        return m is not None and m.end - 1 != last

    def unmap(self, iova: int, size: int) -> int:
        """Remove every mapping that starts inside the range; returns the bytes unmapped."""
        return sum(m.size for m in self._maps.remove(iova, iova + size - 1))

    def unmap_all(self) -> int:
        unmapped = sum(m.size for m in self._maps)
        self._maps.clear()
        return unmapped

    def _walk(self, iova: int, size: int, read: bool, write: bool) -> tuple[list[tuple[int, int]], str | None]:
        """The (vaddr, length) pieces behind a range, which may span adjacent mappings, and why
        the walk stopped short (None when it did not)."""
        pieces: list[tuple[int, int]] = []
        pos, end = iova, iova + size
        while pos < end:
            m = self.find(pos)
            if m is None:
                return pieces, "unmapped"
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
        return pieces, None

    def segments(self, iova: int, size: int, write: bool) -> list[tuple[int, int]] | None:
        """The pieces behind a device access; None after recording the fault."""
        pieces, reason = self._walk(iova, size, not write, write)
        if reason:
            fault = IOMMUFault(iova, size, write, reason)
            self.faults.append(fault)
            if self.fault_log is not None:
                self.fault_log.append(fault)
            log.warning("IOMMU fault: DMA %s of %d bytes at IOVA %#x refused: %s",
                        "write" if write else "read", size, iova, reason)
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
