"""Kernel version profiles: where Linux versions answer differently, the fake follows one of them."""

from __future__ import annotations

from dataclasses import dataclass

from vfio_impl import uapi


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    release: str
    # CHECK_EXTENSION answers of type1 before SET_IOMMU (6.1.x stable dropped UPDATE_VADDR there).
    type1_extensions: frozenset[int]
    dma_cc_iommu: bool
    iova_pgsizes: int
    iova_ranges: tuple[tuple[int, int], ...]
    dma_entry_limit: int = 65535
    max_dirty_bitmap_size: int = 0x10000000

    @property
    def min_pgsize(self) -> int:
        return self.iova_pgsizes & -self.iova_pgsizes

    def iova_valid(self, first: int, last: int) -> bool:
        return any(lo <= first and last <= hi for lo, hi in self.iova_ranges)

    @classmethod
    def named(cls, name: str) -> "Profile":
        try:
            return PROFILES[name]
        except KeyError:
            raise ValueError(f"unknown kernel profile {name!r}; known: {', '.join(PROFILES)}") from None


# Debian bookworm's 6.1 under QEMU's intel-iommu (39-bit address width), as the real runner boots it.
LINUX_6_1 = Profile(
    name="6.1",
    release="6.1.0-fake",
    type1_extensions=frozenset({uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU,
                                uapi.VFIO_TYPE1_NESTING_IOMMU, uapi.VFIO_UNMAP_ALL}),
    dma_cc_iommu=False,
    iova_pgsizes=0x40201000,
    iova_ranges=((0, 0xFEDFFFFF), (0xFEF00000, (1 << 39) - 1)),
)

PROFILES = {"6.1": LINUX_6_1}
DEFAULT_PROFILE = LINUX_6_1.name
