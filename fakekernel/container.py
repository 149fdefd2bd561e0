"""/dev/vfio/vfio with the type1 IOMMU driver (drivers/vfio/container.c, vfio_iommu_type1.c's
ioctls): SET_IOMMU, GET_INFO, MAP_DMA and UNMAP_DMA. The mappings themselves are iommu.py's."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from vfio_impl import uapi

from .err import error
from .iommu import Type1IOMMU
from .uaccess import buf_arg, copy_from_user, copy_to_user, int_arg
from .vfio_main import File, info_cap_chain

if TYPE_CHECKING:
    from .group import IommuGroup
    from .kernel import FakeKernel

U64_MAX = (1 << 64) - 1


class ContainerFile(File):
    """A container; its groups keep it, and its IOMMU, alive after its fd is closed, and the
    last group to leave frees the IOMMU."""

    kind = "container"

    def __init__(self, kernel: "FakeKernel"):
        super().__init__(kernel)
        self.groups: list[IommuGroup] = []
        self.iommu: Type1IOMMU | None = None
        self.v2 = False

    def check_extension(self, arg: int) -> int:
        p = self.kernel.profile
        if arg in p.type1_extensions:
            return 1
        if self.iommu is not None:
            if arg == uapi.VFIO_UPDATE_VADDR:
                return 1
            if arg == uapi.VFIO_DMA_CC_IOMMU:
                return int(p.dma_cc_iommu)
        return 0

    def ioctl(self, request: int, arg) -> int:
        if request == uapi.VFIO_GET_API_VERSION:
            return uapi.VFIO_API_VERSION
        if request == uapi.VFIO_CHECK_EXTENSION:
            return self.check_extension(int_arg(arg))
        if request == uapi.VFIO_SET_IOMMU:
            return self.set_iommu(int_arg(arg))
        if self.iommu is None:
            raise error(errno.EINVAL, "no IOMMU set on the container")
        if request == uapi.VFIO_IOMMU_GET_INFO:
            return self.get_info(buf_arg(arg))
        if request == uapi.VFIO_IOMMU_MAP_DMA:
            return self.map_dma(buf_arg(arg))
        if request == uapi.VFIO_IOMMU_UNMAP_DMA:
            return self.unmap_dma(buf_arg(arg))
        raise error(errno.ENOTTY, f"type1 has no ioctl {request:#x}")

    def set_iommu(self, arg: int) -> int:
        if not self.groups or self.iommu is not None:
            raise error(errno.EINVAL, "SET_IOMMU needs a group and no IOMMU set yet")
        if not self.check_extension(arg):
            raise error(errno.ENODEV, f"no IOMMU driver for type {arg}")
        if arg not in (uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU):
            raise error(errno.EINVAL, f"type1 cannot open type {arg}")
        self.iommu = Type1IOMMU(self.kernel.profile.dma_entry_limit, self.kernel.iommu_fault_log)
        self.v2 = arg == uapi.VFIO_TYPE1v2_IOMMU
        return 0

    def get_info(self, buf: bytearray) -> int:
        layout = uapi.vfio_iommu_type1_info
        minsz = layout.offsetof("iova_pgsizes") + 8
        info = copy_from_user(layout, buf, minsz)
        if info.argsz < minsz:
            raise error(errno.EINVAL, "argsz below vfio_iommu_type1_info's minimum")
        p = self.kernel.profile
        caps = [uapi.MigrationCap(0, p.iova_pgsizes & -p.iova_pgsizes, p.max_dirty_bitmap_size),
                uapi.DmaAvailCap(self.iommu.dma_avail),
                uapi.IovaRangeCap(p.iova_ranges)]
        flags = uapi.VFIO_IOMMU_INFO_PGSIZES | uapi.VFIO_IOMMU_INFO_CAPS
        argsz, cap_offset = info.argsz, 0
        chain = info_cap_chain(caps, layout.size, "iommu", p.info_cap_align)
        if argsz < layout.size + len(chain):
            argsz = layout.size + len(chain)
        else:
            buf[layout.size:layout.size + len(chain)] = chain
            cap_offset = layout.size
        out = layout.pack(argsz=argsz, flags=flags, iova_pgsizes=p.iova_pgsizes, cap_offset=cap_offset)
        copy_to_user(buf, out, layout, info.argsz, minsz)
        return 0

    def map_dma(self, buf: bytearray) -> int:
        layout = uapi.vfio_iommu_type1_dma_map
        minsz = layout.offsetof("size") + 8
        m = copy_from_user(layout, buf, minsz)
        rw = uapi.VFIO_DMA_MAP_FLAG_READ | uapi.VFIO_DMA_MAP_FLAG_WRITE
        if m.argsz < minsz or m.flags & ~(rw | uapi.VFIO_DMA_MAP_FLAG_VADDR):
            raise error(errno.EINVAL, "bad argsz or flags in vfio_iommu_type1_dma_map")
        vaddr_only = bool(m.flags & uapi.VFIO_DMA_MAP_FLAG_VADDR)
        if bool(m.flags & rw) == vaddr_only:
            raise error(errno.EINVAL, "MAP_DMA needs READ/WRITE or VADDR, not both")
        pgsize = self.kernel.profile.min_pgsize
        if not m.size or (m.size | m.iova | m.vaddr) & (pgsize - 1):
            raise error(errno.EINVAL, "size 0 or iova/size/vaddr not page aligned")
        if m.iova + m.size - 1 > U64_MAX or m.vaddr + m.size - 1 > U64_MAX:
            raise error(errno.EINVAL, "iova or vaddr range wraps")
        if vaddr_only:
            raise error(errno.ENOENT if not self.iommu.overlaps(m.iova, m.size) else errno.EINVAL,
                        "no invalidated mapping to update")
        if self.iommu.overlaps(m.iova, m.size):
            raise error(errno.EEXIST, "DMA mapping overlaps an existing one")
        if not self.iommu.dma_avail:
            raise error(errno.ENOSPC, "dma_entry_limit reached")
        if not self.kernel.profile.iova_valid(m.iova, m.iova + m.size - 1):
            raise error(errno.EINVAL, "iova range outside the valid IOVA ranges")
        self.iommu.map(m.iova, m.size, m.vaddr, bool(m.flags & uapi.VFIO_DMA_MAP_FLAG_READ),
                       bool(m.flags & uapi.VFIO_DMA_MAP_FLAG_WRITE))
        return 0

    def unmap_dma(self, buf: bytearray) -> int:
        layout = uapi.vfio_iommu_type1_dma_unmap
        minsz = layout.offsetof("size") + 8
        u = copy_from_user(layout, buf, minsz)
        allowed = uapi.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP | uapi.VFIO_DMA_UNMAP_FLAG_ALL | uapi.VFIO_DMA_UNMAP_FLAG_VADDR
        if u.argsz < minsz or u.flags & ~allowed:
            raise error(errno.EINVAL, "bad argsz or flags in vfio_iommu_type1_dma_unmap")
        if u.flags & uapi.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP:
            if u.flags & (uapi.VFIO_DMA_UNMAP_FLAG_ALL | uapi.VFIO_DMA_UNMAP_FLAG_VADDR):
                raise error(errno.EINVAL, "dirty bitmap with ALL or VADDR")
            raise error(errno.EINVAL, "dirty page tracking is not enabled")
        pgsize = self.kernel.profile.min_pgsize
        if u.iova & (pgsize - 1):
            raise error(errno.EINVAL, "iova not page aligned")
        iommu = self.iommu
        if u.flags & uapi.VFIO_DMA_UNMAP_FLAG_ALL:
            if u.iova or u.size:
                raise error(errno.EINVAL, "UNMAP_ALL takes iova 0 and size 0")
            unmapped = 0 if u.flags & uapi.VFIO_DMA_UNMAP_FLAG_VADDR else iommu.unmap_all()
        else:
            if not u.size or u.size & (pgsize - 1) or u.iova + u.size - 1 > U64_MAX:
                raise error(errno.EINVAL, "size 0, unaligned or wrapping")
            if u.flags & uapi.VFIO_DMA_UNMAP_FLAG_VADDR:
                raise error(errno.EINVAL, "vaddr invalidation is not supported by the fake")
            if self.v2:
                if iommu.first_partial(u.iova, u.size):
                    raise error(errno.EINVAL, "unmap would split a mapping")
                unmapped = iommu.unmap(u.iova, u.size)
            elif _starts_inside(iommu, u.iova):
                unmapped = 0
            else:
                unmapped = iommu.unmap(u.iova, u.size)
        layout.pack_into(buf, 0, argsz=u.argsz, flags=u.flags, iova=u.iova, size=unmapped)
        return 0

    def detach(self, group: "IommuGroup") -> None:
        self.groups.remove(group)
        group.container = None
        if not self.groups and self.iommu is not None:
            self.iommu.unmap_all()
            self.iommu = None
            self.v2 = False


def _starts_inside(iommu: Type1IOMMU, iova: int) -> bool:
    """v1 unmaps nothing when the range starts inside a mapping; a range covering a
    mapping's first byte removes it whole."""
    m = iommu.find(iova)
    return m is not None and m.iova != iova
