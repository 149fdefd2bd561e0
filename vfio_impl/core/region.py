"""A device region: info and caps, trapped pread/pwrite, and mmaps with a switchable fast path.

QEMU keeps a trapped slow path under every mmap so it can turn the mmaps off (for INTx EOI
detection) and on again; `mmap_enabled` is that switch. A `Register` is a handle on one hot
register: it makes Region.read's checks when the mappings change rather than on each access.
"""

from __future__ import annotations

import errno
import mmap as _mmap
import sys
import weakref
from dataclasses import dataclass, field

from vfio_impl import uapi
from vfio_impl.core.errors import VFIOError
from vfio_impl.core.trace import trace, tracing

_PAGE = _mmap.PAGESIZE
# Native formats of each access size; VFIO regions are little-endian, as the hosts this runs on.
_WORD_FORMATS = {1: "B", 2: "H", 4: "I", 8: "Q"}
# A typed memoryview loads and stores in the host's byte order; VFIO regions are little-endian.
LITTLE_ENDIAN_HOST = sys.byteorder == "little"
# A narrow load from MMIO can come back with the register's other bytes above it: QEMU 7.2's TCG
# does not zero-extend a 1- or 2-byte MMIO load from a device that implements 4-byte registers
# (e1000e), and CPython trusts the CPU's zero extension. The trapped path never sees this.
_NARROW_MASKS = {1: 0xFF, 2: 0xFFFF}


@dataclass(slots=True, frozen=True)
class RegionInfo:
    index: int
    flags: int
    size: int
    offset: int
    caps: tuple

    def cap(self, cls):
        return next((c for c in self.caps if isinstance(c, cls)), None)

    @property
    def mmappable(self) -> bool:
        return bool(self.flags & uapi.VFIO_REGION_INFO_FLAG_MMAP)


@dataclass(slots=True)
class MmapArea:
    """One mmap; `words` are typed views of it so an access is one load or store of its size
    (struct.pack_into zero-fills first, which a device register sees as a second write)."""

    offset: int
    size: int
    mem: object = None
    view: object = None
    words: dict = field(default_factory=dict)


class Region:
    def __init__(self, device, info: RegionInfo, name: str = ""):
        self.device = device
        self.host = device.host
        self.info = info
        self.name = name or f"{device.name} region {info.index}"
        self.areas: list[MmapArea] = []
        self._mmap_enabled = True
        self._registers: weakref.WeakSet[Register] = weakref.WeakSet()

    @property
    def mmap_enabled(self) -> bool:
        return self._mmap_enabled

    @mmap_enabled.setter
    def mmap_enabled(self, enabled: bool) -> None:
        self._mmap_enabled = enabled
        self._rebind()

    @property
    def size(self) -> int:
        return self.info.size

    def mmap_areas(self, exclude: tuple[int, int] | None = None) -> list[tuple[int, int]]:
        """Page-aligned areas to map: the sparse caps if given, minus an excluded hole."""
        if not self.info.mmappable or not self.size:
            return []
        sparse = self.info.cap(uapi.SparseMmapCap)
        areas = list(sparse.areas) if sparse else [(0, self.size)]
        if exclude:
            lo = exclude[0] & ~(_PAGE - 1)
            hi = (exclude[0] + exclude[1] + _PAGE - 1) & ~(_PAGE - 1)
            cut = []
            for off, size in areas:
                if off < lo:
                    cut.append((off, min(off + size, lo) - off))
                if off + size > hi:
                    start = max(off, hi)
                    cut.append((start, off + size - start))
            areas = cut
        return [(o, s) for o, s in areas if s > 0]

    def mmap(self, exclude: tuple[int, int] | None = None) -> None:
        """Map every area; on failure unmap what was mapped and raise."""
        prot = ((_mmap.PROT_READ if self.info.flags & uapi.VFIO_REGION_INFO_FLAG_READ else 0)
                | (_mmap.PROT_WRITE if self.info.flags & uapi.VFIO_REGION_INFO_FLAG_WRITE else 0))
        done = []
        try:
            for off, size in self.mmap_areas(exclude):
                mem = self.host.mmap(self.device.fd, size, self.info.offset + off, prot)
                try:
                    view = memoryview(mem)
                except TypeError:
                    view, words = mem, {}
                else:
                    words = {n: view.cast(f) if LITTLE_ENDIAN_HOST else LittleEndianWords(view, n)
                             for n, f in _WORD_FORMATS.items()}
                done.append(MmapArea(off, size, mem, view, words))
                trace("vfio_region_mmap", name=self.name, offset=off, size=size)
        except OSError as e:
            for area in done:
                _close_area(area)
            raise VFIOError.from_oserror(f"{self.name}: failed to mmap offset {off:#x}", e) from e
        self.areas = done
        self._rebind()

    def munmap(self) -> None:
        areas, self.areas = self.areas, []
        self._rebind()
        for area in areas:
            _close_area(area)

    def register(self, addr: int, size: int = 4) -> "Register":
        """A handle on the register at `addr`, for code that reads or writes it in a loop."""
        if size not in _WORD_FORMATS:
            raise VFIOError(f"{self.name}: no {size}-byte register access", errno.EINVAL)
        if addr < 0 or addr + size > self.size:
            raise VFIOError(f"{self.name}: register {addr:#x}+{size} is outside the region's "
                            f"{self.size:#x} bytes", errno.EINVAL)
        return Register(self, addr, size)

    def _rebind(self) -> None:
        for register in self._registers:
            register._bind()

    def _words_at(self, addr: int, size: int) -> tuple[memoryview | None, int]:
        """The typed view and index a naturally aligned 4- or 8-byte access goes to with the mmaps
        on, else (None, 0). Narrow ones stay on Region.read, which masks what TCG leaves above them."""
        if self._mmap_enabled and size >= 4 and not addr % size:
            for area in self.areas:
                rel = addr - area.offset
                if 0 <= rel and rel + size <= area.size and area.words:
                    return area.words[size], rel // size
        return None, 0

    def read(self, addr: int, size: int) -> int:
        """A little-endian access of 1, 2, 4 or 8 bytes: through the mmap when enabled."""
        if self.areas:
            value = self.read_mapped(addr, size)
            if value is not None:
                return value
        return int.from_bytes(self.pread(addr, size), "little")

    def write(self, addr: int, value: int, size: int) -> None:
        """In QEMU's order, vfio_region_write(addr, data, size), as bar_write and config_write. A
        size check catches most calls still in the old (addr, size, value) order."""
        if size not in _WORD_FORMATS:
            raise VFIOError(f"{self.name}: no {size}-byte access (write takes addr, value, size)", errno.EINVAL)
        if not (self.areas and self.write_mapped(addr, value, size)):
            self.pwrite(addr, value.to_bytes(size, "little"))

    def read_mapped(self, addr: int, size: int) -> int | None:
        """The fast path alone (None when it is off or misses), for callers that trap the rest.

        A misaligned access misses too: the trapped path makes it one access, the mmap cannot.
        """
        if self._mmap_enabled:
            for area in self.areas:
                rel = addr - area.offset
                if 0 <= rel and rel + size <= area.size:
                    if not area.words:
                        return area.view.read(rel, size)
                    if not rel % size:
                        value = area.words[size][rel // size]
                        return value & _NARROW_MASKS[size] if size < 4 else value
        return None

    def write_mapped(self, addr: int, value: int, size: int) -> bool:
        if self._mmap_enabled:
            for area in self.areas:
                rel = addr - area.offset
                if 0 <= rel and rel + size <= area.size:
                    if not area.words:
                        area.view.write(rel, size, value)
                        return True
                    if not rel % size:
                        area.words[size][rel // size] = value
                        return True
        return False

    def pread(self, addr: int, n: int) -> bytes:
        try:
            data = self.host.pread(self.device.fd, n, self.info.offset + addr)
        except OSError as e:
            raise VFIOError.from_oserror(f"{self.name}: read of {n} bytes at {addr:#x} failed", e) from e
        if tracing():
            trace("vfio_region_read", name=self.name, addr=addr, size=n)
        return data

    def pwrite(self, addr: int, data: bytes) -> int:
        try:
            n = self.host.pwrite(self.device.fd, data, self.info.offset + addr)
        except OSError as e:
            raise VFIOError.from_oserror(f"{self.name}: write of {len(data)} bytes at {addr:#x} failed", e) from e
        if tracing():
            trace("vfio_region_write", name=self.name, addr=addr, size=len(data))
        return n

    def close(self) -> None:
        self.munmap()


class Register:
    """One register of a region, read and written at close to the mmap's own cost: with the mmap
    on and covering it, an access is one load or store of the typed view; otherwise it is
    Region.read or Region.write. The region rebinds its live registers whenever its mappings
    are made, turned off or on, or unmapped, so a handle never outlives the view it uses."""

    __slots__ = ("region", "addr", "size", "_words", "_index", "__weakref__")

    def __init__(self, region: Region, addr: int, size: int):
        self.region, self.addr, self.size = region, addr, size
        self._bind()
        region._registers.add(self)

    def _bind(self) -> None:
        self._words, self._index = self.region._words_at(self.addr, self.size)

    @property
    def mapped(self) -> bool:
        """Whether an access is a load or store of the mmap (else it goes through Region)."""
        return self._words is not None

    def read(self) -> int:
        words = self._words
        if words is None:
            return self.region.read(self.addr, self.size)
        return words[self._index]

    def write(self, value: int) -> None:
        words = self._words
        if words is None:
            self.region.write(self.addr, value, self.size)
        else:
            words[self._index] = value

    def __repr__(self) -> str:
        return f"<Register {self.region.name}+{self.addr:#x}/{self.size} {'mapped' if self.mapped else 'trapped'}>"


class LittleEndianWords:
    """A mapping as an array of little-endian words of one size, the values a VFIO region holds,
    for a big-endian host, where memoryview.cast would load and store them in the host's order
    (the trapped path converts, so both paths must agree). It indexes as a typed view does."""

    __slots__ = ("view", "size")

    def __init__(self, view: memoryview, size: int):
        self.view, self.size = view, size

    def __getitem__(self, index: int) -> int:
        at = index * self.size
        return int.from_bytes(self.view[at:at + self.size], "little")

    def __setitem__(self, index: int, value: int) -> None:
        at = index * self.size
        self.view[at:at + self.size] = value.to_bytes(self.size, "little")

    def release(self) -> None:
        """The view is the area's, released with it."""


def _close_area(area: MmapArea) -> None:
    for words in area.words.values():
        words.release()
    if isinstance(area.view, memoryview):
        area.view.release()
    area.mem.close()
