"""/dev/vfio/vfio with its IOMMU drivers (drivers/vfio/container.c): type1 (vfio_iommu_type1.c's
ioctls: SET_IOMMU, GET_INFO, MAP_DMA and UNMAP_DMA; the mappings themselves are iommu.py's) and,
with enable_unsafe_noiommu_mode, vfio-noiommu.

vfio-noiommu is registered alongside type1 and answers CHECK_EXTENSION(VFIO_NOIOMMU_IOMMU) with 1
while the mode is on. Once a group is attached, a container may use only the driver of its kind
(vfio_iommu_driver_allowed): a container of no-IOMMU groups only vfio-noiommu, any other only
type1; so CHECK_EXTENSION asks only that driver, SET_IOMMU of the other kind is ENODEV, and the
two kinds of group never share a container (EPERM). vfio-noiommu answers every other ioctl with
ENOTTY: it has no GET_INFO, MAP_DMA or UNMAP_DMA. Linux 6.1 and 6.12 agree on all of it.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from vfio_impl import uapi

from .err import error
from .iommu import PAGE_SIZE, Type1IOMMU
from .uaccess import buf_arg, copy_from_user, copy_to_user, int_arg
from .vfio_main import File, info_cap_chain

if TYPE_CHECKING:
    from .group import IommuGroup
    from .kernel import FakeKernel

U64_MAX = (1 << 64) - 1
TYPE1, NOIOMMU = "vfio-iommu-type1", "vfio-noiommu"


class ContainerFile(File):
    """A container; its groups keep it, and its IOMMU, alive after its fd is closed, and the
    last group to leave frees the IOMMU. `driver` is the IOMMU driver SET_IOMMU chose, `iommu`
    type1's state; `noiommu` says which kind of group was attached last (container->noiommu)."""

    kind = "container"

    def __init__(self, kernel: "FakeKernel"):
        super().__init__(kernel)
        self.groups: list[IommuGroup] = []
        self.driver: str | None = None
        self.iommu: Type1IOMMU | None = None
        self.v2 = False
        self.noiommu = False

    def drivers(self) -> tuple[str, ...]:
        """The registered IOMMU drivers this container may use (vfio_iommu_driver_allowed)."""
        registered = (TYPE1, NOIOMMU) if self.kernel.topology.enable_unsafe_noiommu_mode else (TYPE1,)
        if not self.groups:
            return registered
        return tuple(d for d in registered if (d == NOIOMMU) == self.noiommu)

    def driver_check_extension(self, driver: str, arg: int) -> int:
        """One driver's CHECK_EXTENSION, with its state once SET_IOMMU chose it."""
        if driver == NOIOMMU:
            return int(arg == uapi.VFIO_NOIOMMU_IOMMU)
        p = self.kernel.profile
        if arg in p.type1_extensions:
            return 1
        if self.iommu is not None:
            if arg == uapi.VFIO_UPDATE_VADDR:
                # Not with an mdev attached, which could not pin while vaddrs change.
                return int(not any(g.emulated for g in self.groups))
            if arg == uapi.VFIO_DMA_CC_IOMMU:
                # Every domain must enforce coherency; with no domain, none fails to.
                return int(p.dma_cc_iommu or not self.domains)
        return 0

    @property
    def domains(self) -> bool:
        """Whether type1 has an IOMMU domain: it makes none for an mdev's emulated group."""
        return any(not g.emulated for g in self.groups)

    def check_extension(self, arg: int) -> int:
        """The chosen driver's answer, or the first positive one of the drivers allowed."""
        drivers = (self.driver,) if self.driver else self.drivers()
        return max((self.driver_check_extension(d, arg) for d in drivers), default=0)

    def ioctl(self, request: int, arg) -> int:
        if request == uapi.VFIO_GET_API_VERSION:
            return uapi.VFIO_API_VERSION
        if request == uapi.VFIO_CHECK_EXTENSION:
            return self.check_extension(int_arg(arg))
        if request == uapi.VFIO_SET_IOMMU:
            return self.set_iommu(int_arg(arg))
        if self.driver is None:
            raise error(errno.EINVAL, "no IOMMU set on the container")
        if self.driver == NOIOMMU:
            raise error(errno.ENOTTY, f"vfio-noiommu has no ioctl {request:#x}")
        if request == uapi.VFIO_IOMMU_GET_INFO:
            return self.get_info(buf_arg(arg))
        if request == uapi.VFIO_IOMMU_MAP_DMA:
            return self.map_dma(buf_arg(arg))
        if request == uapi.VFIO_IOMMU_UNMAP_DMA:
            return self.unmap_dma(buf_arg(arg))
        raise error(errno.ENOTTY, f"type1 has no ioctl {request:#x}")

    def set_iommu(self, arg: int) -> int:
        """vfio_ioctl_set_iommu: with a group attached, one driver is allowed; it must claim
        the type, then open it."""
        if not self.groups or self.driver is not None:
            raise error(errno.EINVAL, "SET_IOMMU needs a group and no IOMMU set yet")
        (driver,) = self.drivers()
        if not self.driver_check_extension(driver, arg):
            raise error(errno.ENODEV, f"no IOMMU driver for type {arg}")
        if driver == TYPE1:
            if arg not in (uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU):
                raise error(errno.EINVAL, f"type1 cannot open type {arg}")
            self.iommu = Type1IOMMU(self.kernel.profile.dma_entry_limit, self.kernel.iommu_fault_log)
            self.v2 = arg == uapi.VFIO_TYPE1v2_IOMMU
        self.driver = driver
        return 0

    def get_info(self, buf: bytearray) -> int:
        layout = uapi.vfio_iommu_type1_info
        minsz = layout.offsetof("iova_pgsizes") + 8
        info = copy_from_user(layout, buf, minsz)
        if info.argsz < minsz:
            raise error(errno.EINVAL, "argsz below vfio_iommu_type1_info's minimum")
        p = self.kernel.profile
        # With no domain, the page sizes stay the PAGE_MASK type1 starts with, and there is no
        # IOVA range list to report (vfio_iommu_iova_build_caps adds nothing).
        pgsizes = p.iova_pgsizes if self.domains else ~(PAGE_SIZE - 1) & U64_MAX
        caps = [uapi.MigrationCap(0, pgsizes & -pgsizes, p.max_dirty_bitmap_size),
                uapi.DmaAvailCap(self.iommu.dma_avail)]
        if self.domains:
            caps.append(uapi.IovaRangeCap(p.iova_ranges))
        flags = uapi.VFIO_IOMMU_INFO_PGSIZES | uapi.VFIO_IOMMU_INFO_CAPS
        argsz, cap_offset = info.argsz, 0
        chain = info_cap_chain(caps, layout.size, "iommu", p.info_cap_align)
        if argsz < layout.size + len(chain):
            argsz = layout.size + len(chain)
        else:
            buf[layout.size:layout.size + len(chain)] = chain
            cap_offset = layout.size
        out = layout.pack(argsz=argsz, flags=flags, iova_pgsizes=pgsizes, cap_offset=cap_offset)
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
        if self.domains and not self.kernel.profile.iova_valid(m.iova, m.iova + m.size - 1):
            raise error(errno.EINVAL, "iova range outside the valid IOVA ranges")
        # Only a domain pins at once; an mdev driver pins what it uses, when it uses it.
        self.iommu.map(m.iova, m.size, m.vaddr, bool(m.flags & uapi.VFIO_DMA_MAP_FLAG_READ),
                       bool(m.flags & uapi.VFIO_DMA_MAP_FLAG_WRITE), pin=self.domains)
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

    def attach(self, group: "IommuGroup") -> None:
        """vfio_container_attach_group: the two kinds of group never mix, and an IOMMU group must
        be viable to be claimed for DMA."""
        if self.groups and self.noiommu != group.noiommu:
            raise error(errno.EPERM, "no-IOMMU and IOMMU groups cannot share a container")
        if not group.noiommu and not self.kernel.sysfs.viable(group.number):
            raise error(errno.EPERM, "a device in the group is bound to a non-vfio driver")
        self.groups.append(group)
        group.container = self
        self.noiommu = group.noiommu

    def detach(self, group: "IommuGroup") -> None:
        """The last group to leave takes the IOMMU driver with it."""
        self.groups.remove(group)
        group.container = None
        if not self.groups and self.driver is not None:
            if self.iommu is not None:
                self.iommu.unmap_all()
            self.driver = self.iommu = None
            self.v2 = False


def _starts_inside(iommu: Type1IOMMU, iova: int) -> bool:
    """v1 unmaps nothing when the range starts inside a mapping; a range covering a
    mapping's first byte removes it whole."""
    m = iommu.find(iova)
    return m is not None and m.iova != iova
