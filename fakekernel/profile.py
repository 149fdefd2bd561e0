"""Kernel version profiles: where Linux versions answer differently, the fake follows one of them."""

from __future__ import annotations

import errno
from dataclasses import dataclass, replace

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
    # VFIO_GROUP_SET_CONTAINER with a fd that is no container: 6.1 says EINVAL; from 6.2 group.c
    # tries a container, then an iommufd, and says EBADFD ("The FD passed is not recognized").
    unrecognized_container_errno: int
    # vfio_info_cap_add rounds each capability up to this many bytes: 1 on 6.1 (back to back),
    # 8 from 6.6 ("vfio: align capability structures"), so DMA_AVAIL's 12 bytes take 16.
    info_cap_align: int
    # vfio-pci keeps an MSI/MSI-X context per vector (an xarray, from 6.5) instead of 6.1's array
    # of vdev->num_ctx: SET_IRQS is no longer bounded by the vectors enabled, a trigger for a
    # vector with no eventfd is skipped, and a vector not yet allocated fails only where it is set.
    irq_ctx_xarray: bool
    # pci_msix_can_alloc_dyn, as vfio-pci reads it into has_dyn_msix (from 6.5): MSI-X vectors can
    # be allocated while MSI-X is enabled, so GET_IRQ_INFO drops NORESIZE for MSI-X.
    msix_can_alloc_dyn: bool
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

    @classmethod
    def modelling(cls, release: str) -> "Profile | None":
        """The profile of a kernel release (`uname -r`): 6.1.0-28-amd64 is 6.1's, 6.12.12+bpo-amd64
        6.12's; None for a kernel no profile models."""
        return next((p for p in PROFILES.values() if release.startswith(f"{p.name}.")), None)


# Debian bookworm's 6.1 under QEMU's intel-iommu (39-bit address width), as the real runner boots it.
LINUX_6_1 = Profile(
    name="6.1",
    release="6.1.0-fake",
    type1_extensions=frozenset({uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU,
                                uapi.VFIO_TYPE1_NESTING_IOMMU, uapi.VFIO_UNMAP_ALL}),
    dma_cc_iommu=False,
    iova_pgsizes=0x40201000,
    iova_ranges=((0, 0xFEDFFFFF), (0xFEF00000, (1 << 39) - 1)),
    unrecognized_container_errno=errno.EINVAL,
    info_cap_align=1,
    irq_ctx_xarray=False,
    msix_can_alloc_dyn=False,
)

# Debian bookworm's 6.12 LTS track on the same runner: the same IOMMU, a newer VFIO core.
LINUX_6_12 = replace(
    LINUX_6_1,
    name="6.12",
    release="6.12.0-fake",
    unrecognized_container_errno=errno.EBADFD,
    info_cap_align=8,
    irq_ctx_xarray=True,
    msix_can_alloc_dyn=True,
)

PROFILES = {p.name: p for p in (LINUX_6_1, LINUX_6_12)}
DEFAULT_PROFILE = LINUX_6_1.name
