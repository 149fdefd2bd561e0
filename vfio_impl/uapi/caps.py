"""VFIO capability chains, the extensible tail of the GET_INFO replies.

A chain is a linked list inside the one buffer the ioctl filled: each
``vfio_info_cap_header.next`` is an offset from the start of the info struct,
and 0 ends it.  Region and IOMMU capabilities reuse the same small ids, so
every call says which ``kind`` of chain it handles.  Building and parsing
live together so that a fake kernel and the driver share one encoding.
"""

import struct
from dataclasses import dataclass
from typing import ClassVar, Literal

from vfio_impl.uapi._constants import (
    VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
    VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION,
    VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL,
    VFIO_REGION_INFO_CAP_MSIX_MAPPABLE,
    VFIO_REGION_INFO_CAP_SPARSE_MMAP,
    VFIO_REGION_INFO_CAP_TYPE,
)
from vfio_impl.uapi._structs import (
    vfio_info_cap_header,
    vfio_iommu_type1_info_cap_iova_range,
    vfio_iommu_type1_info_cap_migration,
    vfio_iommu_type1_info_dma_avail,
    vfio_iova_range,
    vfio_region_info_cap_sparse_mmap,
    vfio_region_info_cap_type,
    vfio_region_sparse_mmap_area,
)
from vfio_impl.uapi.layout import Layout

__all__ = [
    "Cap",
    "CapKind",
    "DmaAvailCap",
    "IovaRangeCap",
    "MigrationCap",
    "MsixMappableCap",
    "RegionTypeCap",
    "SparseMmapCap",
    "UnknownCap",
    "build_chain",
    "chain_size",
    "parse_chain",
]

CapKind = Literal["region", "iommu"]

_ALIGN = 8  # info structs end on a u64 boundary, so chains start on one
_NEXT = struct.Struct("=I")
_NEXT_OFFSET = vfio_info_cap_header.offsetof("next")


def _need(buf, offset: int, size: int, what: str) -> None:
    if offset + size > len(buf):
        raise ValueError(
            f"truncated {what} at offset {offset}: needs {size} bytes, "
            f"buffer ends {len(buf) - offset} bytes later"
        )


def _pack_pairs(cap, layout: Layout, count: str, array: str, item: Layout, pairs) -> bytes:
    first = layout.offsetof(array)
    buf = bytearray(max(layout.size, first + item.size * len(pairs)))
    layout.pack_into(buf, 0, header_id=cap.ID, header_version=cap.VERSION, **{count: len(pairs)})
    for i, pair in enumerate(pairs):
        item.struct.pack_into(buf, first + i * item.size, *pair)
    return bytes(buf)


def _unpack_pairs(buf, offset: int, layout: Layout, count: str, array: str, item: Layout, what: str):
    _need(buf, offset, layout.size, what)
    n = getattr(layout.unpack(buf, offset), count)
    first = offset + layout.offsetof(array)
    _need(buf, first, n * item.size, f"{what} array of {n}")
    return tuple(item.struct.unpack_from(buf, first + i * item.size) for i in range(n))


def _pairs(pairs) -> tuple[tuple[int, int], ...]:
    return tuple((int(a), int(b)) for a, b in pairs)


@dataclass(frozen=True, slots=True)
class SparseMmapCap:
    """The (offset, size) parts of a region that may be mmap'ed, when not all of it may."""

    areas: tuple[tuple[int, int], ...]

    KIND: ClassVar[str] = "region"
    ID: ClassVar[int] = VFIO_REGION_INFO_CAP_SPARSE_MMAP
    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "areas", _pairs(self.areas))

    def _encode(self) -> bytes:
        return _pack_pairs(self, vfio_region_info_cap_sparse_mmap, "nr_areas", "areas",
                           vfio_region_sparse_mmap_area, self.areas)

    @classmethod
    def _decode(cls, buf, offset: int) -> "SparseMmapCap":
        return cls(_unpack_pairs(buf, offset, vfio_region_info_cap_sparse_mmap, "nr_areas",
                                 "areas", vfio_region_sparse_mmap_area, "sparse mmap cap"))


@dataclass(frozen=True, slots=True)
class RegionTypeCap:
    """What a device-specific region (index >= the bus's fixed ones) contains."""

    type: int
    subtype: int

    KIND: ClassVar[str] = "region"
    ID: ClassVar[int] = VFIO_REGION_INFO_CAP_TYPE
    VERSION: ClassVar[int] = 1

    def _encode(self) -> bytes:
        return bytes(vfio_region_info_cap_type.pack(
            header_id=self.ID, header_version=self.VERSION, type=self.type, subtype=self.subtype))

    @classmethod
    def _decode(cls, buf, offset: int) -> "RegionTypeCap":
        _need(buf, offset, vfio_region_info_cap_type.size, "region type cap")
        cap = vfio_region_info_cap_type.unpack(buf, offset)
        return cls(cap.type, cap.subtype)


@dataclass(frozen=True, slots=True)
class MsixMappableCap:
    """The MSI-X table in this BAR may be mmap'ed; the header alone says so."""

    KIND: ClassVar[str] = "region"
    ID: ClassVar[int] = VFIO_REGION_INFO_CAP_MSIX_MAPPABLE
    VERSION: ClassVar[int] = 1

    def _encode(self) -> bytes:
        return bytes(vfio_info_cap_header.pack(id=self.ID, version=self.VERSION))

    @classmethod
    def _decode(cls, buf, offset: int) -> "MsixMappableCap":
        return cls()


@dataclass(frozen=True, slots=True)
class IovaRangeCap:
    """The IOVA windows DMA may be mapped in, as inclusive (start, end) pairs."""

    ranges: tuple[tuple[int, int], ...]

    KIND: ClassVar[str] = "iommu"
    ID: ClassVar[int] = VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE
    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranges", _pairs(self.ranges))

    def _encode(self) -> bytes:
        return _pack_pairs(self, vfio_iommu_type1_info_cap_iova_range, "nr_iovas",
                           "iova_ranges", vfio_iova_range, self.ranges)

    @classmethod
    def _decode(cls, buf, offset: int) -> "IovaRangeCap":
        return cls(_unpack_pairs(buf, offset, vfio_iommu_type1_info_cap_iova_range, "nr_iovas",
                                 "iova_ranges", vfio_iova_range, "IOVA range cap"))


@dataclass(frozen=True, slots=True)
class MigrationCap:
    """Dirty page tracking limits of the type1 IOMMU."""

    flags: int
    pgsize_bitmap: int
    max_dirty_bitmap_size: int

    KIND: ClassVar[str] = "iommu"
    ID: ClassVar[int] = VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION
    VERSION: ClassVar[int] = 1

    def _encode(self) -> bytes:
        return bytes(vfio_iommu_type1_info_cap_migration.pack(
            header_id=self.ID, header_version=self.VERSION, flags=self.flags,
            pgsize_bitmap=self.pgsize_bitmap, max_dirty_bitmap_size=self.max_dirty_bitmap_size))

    @classmethod
    def _decode(cls, buf, offset: int) -> "MigrationCap":
        _need(buf, offset, vfio_iommu_type1_info_cap_migration.size, "migration cap")
        cap = vfio_iommu_type1_info_cap_migration.unpack(buf, offset)
        return cls(cap.flags, cap.pgsize_bitmap, cap.max_dirty_bitmap_size)


@dataclass(frozen=True, slots=True)
class DmaAvailCap:
    """How many more DMA mappings the container accepts (the dma_entry_limit)."""

    avail: int

    KIND: ClassVar[str] = "iommu"
    ID: ClassVar[int] = VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL
    VERSION: ClassVar[int] = 1

    def _encode(self) -> bytes:
        return bytes(vfio_iommu_type1_info_dma_avail.pack(
            header_id=self.ID, header_version=self.VERSION, avail=self.avail))

    @classmethod
    def _decode(cls, buf, offset: int) -> "DmaAvailCap":
        _need(buf, offset, vfio_iommu_type1_info_dma_avail.size, "DMA avail cap")
        return cls(vfio_iommu_type1_info_dma_avail.unpack(buf, offset).avail)


@dataclass(frozen=True, slots=True)
class UnknownCap:
    """A capability this module has no layout for, kept so nothing is lost.

    ``data`` is everything after the header up to the next capability (or the
    end of the buffer for the last one).
    """

    id: int
    version: int
    data: bytes = b""

    def _encode(self) -> bytes:
        return bytes(vfio_info_cap_header.pack(id=self.id, version=self.version)) + bytes(self.data)


Cap = SparseMmapCap | RegionTypeCap | MsixMappableCap | IovaRangeCap | MigrationCap | DmaAvailCap | UnknownCap

_KNOWN: dict[str, dict[tuple[int, int], type]] = {"region": {}, "iommu": {}}
for _cls in (SparseMmapCap, RegionTypeCap, MsixMappableCap, IovaRangeCap, MigrationCap, DmaAvailCap):
    _KNOWN[_cls.KIND][_cls.ID, _cls.VERSION] = _cls
del _cls


def _known(kind: str) -> dict[tuple[int, int], type]:
    try:
        return _KNOWN[kind]
    except KeyError:
        raise ValueError(f"capability kind must be 'region' or 'iommu', not {kind!r}") from None


def parse_chain(buf, cap_offset: int, kind: CapKind) -> list[Cap]:
    """Walk the chain starting at ``cap_offset`` (0: there is none).

    An (id, version) pair without a known layout comes back as UnknownCap, as
    a new version may have changed the layout.  Raises ValueError when the
    chain leaves the buffer, a capability is cut short, or the chain loops.
    """
    known = _known(kind)
    caps: list[Cap] = []
    seen: set[int] = set()
    offset = cap_offset
    while offset:
        if offset in seen:
            raise ValueError(f"{kind} capability chain loops back to offset {offset}")
        seen.add(offset)
        if offset < 0 or offset + vfio_info_cap_header.size > len(buf):
            raise ValueError(
                f"{kind} capability at offset {offset} lies outside the {len(buf)}-byte buffer")
        cap_id, version, next_offset = vfio_info_cap_header.unpack(buf, offset)
        cls = known.get((cap_id, version))
        if cls is not None:
            caps.append(cls._decode(buf, offset))
        else:
            end = next_offset if offset < next_offset <= len(buf) else len(buf)
            data = bytes(buf[offset + vfio_info_cap_header.size:end])
            caps.append(UnknownCap(cap_id, version, data))
        offset = next_offset
    return caps


def _check_start(start: int) -> None:
    if start <= 0 or start % _ALIGN:
        raise ValueError(f"a capability chain must start at a positive multiple of {_ALIGN}, not {start}")


def build_chain(caps, start: int, kind: CapKind) -> bytes:
    """Encode ``caps`` as a chain to be placed at absolute offset ``start``.

    ``start`` is where the chain goes in the info buffer (the info struct size
    rounded up to 8), so every ``next`` can be absolute as the kernel writes
    it.  Caps follow each other with no padding, as vfio_info_cap_add lays
    them out: on 6.1 the IOVA range cap after the 12-byte DMA_AVAIL cap sits
    at offset 68.
    """
    known = _known(kind)
    _check_start(start)
    chain = bytearray()
    previous = None
    for cap in caps:
        if not isinstance(cap, UnknownCap) and known.get((cap.ID, cap.VERSION)) is not type(cap):
            raise ValueError(f"{type(cap).__name__} is not a {kind} capability")
        if previous is not None:
            _NEXT.pack_into(chain, previous + _NEXT_OFFSET, start + len(chain))
        previous = len(chain)
        chain += cap._encode()
    return bytes(chain)


def chain_size(caps, start: int) -> int:
    """Bytes ``build_chain`` will return, so argsz can be ``start + chain_size``."""
    _check_start(start)
    size = 0
    for cap in caps:
        size += len(cap._encode())
    return size
