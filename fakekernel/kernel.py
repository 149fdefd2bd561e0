"""FakeKernel: one object owning all fake state, driven through the same Host methods as Linux."""

from __future__ import annotations

import errno
import mmap as _mmap
import os
import re
import selectors
import struct
import tempfile
import threading
import weakref
from contextlib import ExitStack
from typing import Callable

from pyfakefs import fake_open, fake_os

from vfio_impl import uapi
from vfio_impl.host import EventfdMixin

from . import devices as _devices
from . import pci
from .faults import Faults
from .iommu import PAGE_SIZE, IOMMUFault, Type1IOMMU
from .profile import Profile
from .sysfs import Sysfs
from .topology import PciDeviceSpec, Topology
from .vfio_ccw import OFFSET_SHIFT as CCW_OFFSET_SHIFT
from .vfio_ccw import VfioCcwDevice
from .vfio_pci import VfioPciDevice
from .vfio_platform import VfioPlatformDevice

_GROUP_RE = re.compile(r"^/dev/vfio/(\d+)$")
_INT = struct.Struct("=i")
_GET_REGION_INFO = uapi.VFIO_DEVICE_GET_REGION_INFO
_REGION_INFO_SIZE = uapi.vfio_region_info.size
# argsz and index, unpacked from the whole struct so a short buffer fails as copy_from_user does.
_ARGSZ_AND_INDEX = struct.Struct(f"=I{uapi.vfio_region_info.offsetof('index') - 4}xI"
                                 f"{_REGION_INFO_SIZE - uapi.vfio_region_info.offsetof('index') - 4}x")
PAGE_MASK = ~(PAGE_SIZE - 1)
IVSHMEM_SHM_SIZE = 1 << 20  # what ci/real-vm.sh gives its server (-l 1M)


def _err(code: int, what: str) -> OSError:
    return OSError(code, f"{os.strerror(code)} ({what})")


class File:
    """An open fake file; `fd` is a real placeholder fd so numbers stay unique in the process."""

    kind = "file"
    # Requests whose answer reads only what was fixed at open, by the name of their handler:
    # Linux takes no lock for them, and neither does the fake, which calls the handler straight
    # from FakeKernel.ioctl (`lockless` holds this class's functions), so a test asking for
    # them pays no more than a syscall.
    lockless_handlers: dict[int, str] = {}
    lockless: dict[int, Callable] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.lockless = {request: getattr(cls, name) for request, name in cls.lockless_handlers.items()}

    def __init__(self, kernel: "FakeKernel"):
        self.kernel = kernel
        self.fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)

    def ioctl(self, request: int, arg) -> int:
        raise _err(errno.ENOTTY, f"unknown ioctl {request:#x} on a {self.kind}")

    def release(self) -> None:
        pass


class IommuGroup:
    """Kernel state of one IOMMU group: its open file, its container, its open devices."""

    def __init__(self, number: int):
        self.number = number
        self.opened: GroupFile | None = None
        self.container: ContainerFile | None = None
        self.device_fds = 0


class ContainerFile(File):
    kind = "container"

    def __init__(self, kernel: "FakeKernel"):
        super().__init__(kernel)
        self.groups: list[IommuGroup] = []
        self.iommu: Type1IOMMU | None = None
        self.v2 = False
        self.closed = False

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
            return self.check_extension(_int_arg(arg))
        if request == uapi.VFIO_SET_IOMMU:
            return self.set_iommu(_int_arg(arg))
        if self.iommu is None:
            raise _err(errno.EINVAL, "no IOMMU set on the container")
        if request == uapi.VFIO_IOMMU_GET_INFO:
            return self.get_info(_buf_arg(arg))
        if request == uapi.VFIO_IOMMU_MAP_DMA:
            return self.map_dma(_buf_arg(arg))
        if request == uapi.VFIO_IOMMU_UNMAP_DMA:
            return self.unmap_dma(_buf_arg(arg))
        raise _err(errno.ENOTTY, f"type1 has no ioctl {request:#x}")

    def set_iommu(self, arg: int) -> int:
        if not self.groups or self.iommu is not None:
            raise _err(errno.EINVAL, "SET_IOMMU needs a group and no IOMMU set yet")
        if not self.check_extension(arg):
            raise _err(errno.ENODEV, f"no IOMMU driver for type {arg}")
        if arg not in (uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU):
            raise _err(errno.EINVAL, f"type1 cannot open type {arg}")
        self.iommu = Type1IOMMU(self.kernel.profile.dma_entry_limit, self.kernel._iommu_faults)
        self.v2 = arg == uapi.VFIO_TYPE1v2_IOMMU
        return 0

    def get_info(self, buf: bytearray) -> int:
        layout = uapi.vfio_iommu_type1_info
        minsz = layout.offsetof("iova_pgsizes") + 8
        info = _unpack_min(layout, buf, minsz)
        if info.argsz < minsz:
            raise _err(errno.EINVAL, "argsz below vfio_iommu_type1_info's minimum")
        p = self.kernel.profile
        caps = [uapi.MigrationCap(0, p.iova_pgsizes & -p.iova_pgsizes, p.max_dirty_bitmap_size),
                uapi.DmaAvailCap(self.iommu.dma_avail),
                uapi.IovaRangeCap(p.iova_ranges)]
        flags = uapi.VFIO_IOMMU_INFO_PGSIZES | uapi.VFIO_IOMMU_INFO_CAPS
        argsz, cap_offset = info.argsz, 0
        chain = uapi.build_chain(caps, layout.size, "iommu")
        if argsz < layout.size + len(chain):
            argsz = layout.size + len(chain)
        else:
            buf[layout.size:layout.size + len(chain)] = chain
            cap_offset = layout.size
        out = layout.pack(argsz=argsz, flags=flags, iova_pgsizes=p.iova_pgsizes, cap_offset=cap_offset)
        _copy_back(buf, out, layout, info.argsz, minsz)
        return 0

    def map_dma(self, buf: bytearray) -> int:
        layout = uapi.vfio_iommu_type1_dma_map
        minsz = layout.offsetof("size") + 8
        m = _unpack_min(layout, buf, minsz)
        rw = uapi.VFIO_DMA_MAP_FLAG_READ | uapi.VFIO_DMA_MAP_FLAG_WRITE
        if m.argsz < minsz or m.flags & ~(rw | uapi.VFIO_DMA_MAP_FLAG_VADDR):
            raise _err(errno.EINVAL, "bad argsz or flags in vfio_iommu_type1_dma_map")
        vaddr_only = bool(m.flags & uapi.VFIO_DMA_MAP_FLAG_VADDR)
        if bool(m.flags & rw) == vaddr_only:
            raise _err(errno.EINVAL, "MAP_DMA needs READ/WRITE or VADDR, not both")
        pgsize = self.kernel.profile.min_pgsize
        if not m.size or (m.size | m.iova | m.vaddr) & (pgsize - 1):
            raise _err(errno.EINVAL, "size 0 or iova/size/vaddr not page aligned")
        if m.iova + m.size - 1 > uapi_u64_max or m.vaddr + m.size - 1 > uapi_u64_max:
            raise _err(errno.EINVAL, "iova or vaddr range wraps")
        if vaddr_only:
            raise _err(errno.ENOENT if not self.iommu.overlaps(m.iova, m.size) else errno.EINVAL,
                       "no invalidated mapping to update")
        if self.iommu.overlaps(m.iova, m.size):
            raise _err(errno.EEXIST, "DMA mapping overlaps an existing one")
        if not self.iommu.dma_avail:
            raise _err(errno.ENOSPC, "dma_entry_limit reached")
        if not self.kernel.profile.iova_valid(m.iova, m.iova + m.size - 1):
            raise _err(errno.EINVAL, "iova range outside the valid IOVA ranges")
        self.iommu.map(m.iova, m.size, m.vaddr, bool(m.flags & uapi.VFIO_DMA_MAP_FLAG_READ),
                       bool(m.flags & uapi.VFIO_DMA_MAP_FLAG_WRITE))
        return 0

    def unmap_dma(self, buf: bytearray) -> int:
        layout = uapi.vfio_iommu_type1_dma_unmap
        minsz = layout.offsetof("size") + 8
        u = _unpack_min(layout, buf, minsz)
        allowed = uapi.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP | uapi.VFIO_DMA_UNMAP_FLAG_ALL | uapi.VFIO_DMA_UNMAP_FLAG_VADDR
        if u.argsz < minsz or u.flags & ~allowed:
            raise _err(errno.EINVAL, "bad argsz or flags in vfio_iommu_type1_dma_unmap")
        if u.flags & uapi.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP:
            if u.flags & (uapi.VFIO_DMA_UNMAP_FLAG_ALL | uapi.VFIO_DMA_UNMAP_FLAG_VADDR):
                raise _err(errno.EINVAL, "dirty bitmap with ALL or VADDR")
            raise _err(errno.EINVAL, "dirty page tracking is not enabled")
        pgsize = self.kernel.profile.min_pgsize
        if u.iova & (pgsize - 1):
            raise _err(errno.EINVAL, "iova not page aligned")
        iommu = self.iommu
        if u.flags & uapi.VFIO_DMA_UNMAP_FLAG_ALL:
            if u.iova or u.size:
                raise _err(errno.EINVAL, "UNMAP_ALL takes iova 0 and size 0")
            unmapped = 0 if u.flags & uapi.VFIO_DMA_UNMAP_FLAG_VADDR else iommu.unmap_all()
        else:
            if not u.size or u.size & (pgsize - 1) or u.iova + u.size - 1 > uapi_u64_max:
                raise _err(errno.EINVAL, "size 0, unaligned or wrapping")
            if u.flags & uapi.VFIO_DMA_UNMAP_FLAG_VADDR:
                raise _err(errno.EINVAL, "vaddr invalidation is not supported by the fake")
            if self.v2:
                if iommu.first_partial(u.iova, u.size):
                    raise _err(errno.EINVAL, "unmap would split a mapping")
                unmapped = iommu.unmap(u.iova, u.size)
            elif _starts_inside(iommu, u.iova):
                unmapped = 0
            else:
                unmapped = iommu.unmap(u.iova, u.size)
        layout.pack_into(buf, 0, argsz=u.argsz, flags=u.flags, iova=u.iova, size=unmapped)
        return 0

    def detach(self, group: IommuGroup) -> None:
        self.groups.remove(group)
        group.container = None
        if not self.groups and self.iommu is not None:
            self.iommu.unmap_all()
            self.iommu = None
            self.v2 = False


uapi_u64_max = (1 << 64) - 1


def _starts_inside(iommu: Type1IOMMU, iova: int) -> bool:
    """v1 unmaps nothing when the range starts inside a mapping; a range covering a
    mapping's first byte removes it whole."""
    m = iommu.find(iova)
    return m is not None and m.iova != iova


class GroupFile(File):
    kind = "group"

    def __init__(self, kernel: "FakeKernel", group: IommuGroup):
        super().__init__(kernel)
        self.group = group
        self.released = False

    def ioctl(self, request: int, arg) -> int:
        g = self.group
        if request == uapi.VFIO_GROUP_GET_STATUS:
            buf = _buf_arg(arg)
            status = _unpack_min(uapi.vfio_group_status, buf, 8)
            if status.argsz < 8:
                raise _err(errno.EINVAL, "argsz below vfio_group_status")
            if g.container:
                flags = uapi.VFIO_GROUP_FLAGS_VIABLE | uapi.VFIO_GROUP_FLAGS_CONTAINER_SET
            else:
                flags = uapi.VFIO_GROUP_FLAGS_VIABLE if self.kernel.sysfs.viable(g.number) else 0
            uapi.vfio_group_status.pack_into(buf, 0, argsz=status.argsz, flags=flags)
            return 0
        if request == uapi.VFIO_GROUP_SET_CONTAINER:
            buf = _buf_arg(arg)
            if len(buf) < 4:
                raise _err(errno.EFAULT, "SET_CONTAINER takes a pointer to an int")
            fd = _INT.unpack_from(buf)[0]
            target = self.kernel.files.get(fd)
            if target is None and not _is_open(fd):
                raise _err(errno.EBADF, f"fd {fd} is not open")
            if g.container:
                raise _err(errno.EINVAL, "group already has a container")
            if not isinstance(target, ContainerFile):
                raise _err(errno.EINVAL, f"fd {fd} is not a VFIO container")
            if not self.kernel.sysfs.viable(g.number):
                raise _err(errno.EPERM, "a device in the group is bound to a non-vfio driver")
            target.groups.append(g)
            g.container = target
            return 0
        if request == uapi.VFIO_GROUP_UNSET_CONTAINER:
            if not g.container:
                raise _err(errno.EINVAL, "group has no container")
            if g.device_fds:
                raise _err(errno.EBUSY, "device fds are still open")
            g.container.detach(g)
            return 0
        if request == uapi.VFIO_GROUP_GET_DEVICE_FD:
            return self.get_device_fd(arg)
        return super().ioctl(request, arg)

    def get_device_fd(self, arg) -> int:
        if isinstance(arg, int):
            raise _err(errno.EFAULT, "GET_DEVICE_FD takes a pointer to a name")
        raw = bytes(arg)
        nul = raw.find(b"\0")
        if nul < 0 or nul >= PAGE_SIZE:
            raise _err(errno.EINVAL, "device name is not NUL-terminated within a page")
        name = raw[:nul].decode("ascii", "replace")
        bdf, _, options = name.partition(" ")
        topology = self.kernel.topology
        spec = next((d for d in topology.group_members(self.group.number)
                     if d.bdf == bdf and d.driver == "vfio-pci"), None)
        platform = next((d for d in topology.platform_members(self.group.number)
                         if d.name == name and d.driver == "vfio-platform"), None)
        ccw = next((d for d in topology.ccw_members(self.group.number)
                    if d.uuid == name and d.driver == "vfio_ccw_mdev"), None)
        if spec is None and platform is None and ccw is None:
            raise _err(errno.ENODEV, f"no device {name!r} in group {self.group.number}")
        if spec is not None and options.strip():
            raise _err(errno.EINVAL, f"unknown device options {options.strip()!r}")
        container = self.group.container
        if container is None or container.iommu is None:
            raise _err(errno.EINVAL, "the group's container has no IOMMU set")
        if platform is not None:
            device, cls = self.kernel.platform_devices[name], PlatformDeviceFile
        elif ccw is not None:
            device, cls = self.kernel.ccw_devices[ccw.schid], CcwDeviceFile
        else:
            device, cls = self.kernel.vfio_devices[bdf], DeviceFile
        device.open_device()
        self.group.device_fds += 1
        return self.kernel._install(cls(self.kernel, device, self.group))

    def release(self) -> None:
        """Device fds hold the group file, so detaching waits for the last of them."""
        self.released = True
        if not self.group.device_fds:
            self.finish_release()

    def finish_release(self) -> None:
        g = self.group
        if g.container:
            container = g.container
            container.detach(g)
            self.kernel._maybe_free_container(container)
        g.opened = None


class DeviceFile(File):
    kind = "device"
    # Region N starts at N << OFFSET_SHIFT in the device fd.
    OFFSET_SHIFT = 40
    lockless_handlers = {_GET_REGION_INFO: "get_region_info", uapi.VFIO_DEVICE_GET_INFO: "get_info"}

    def __init__(self, kernel: "FakeKernel", device: VfioPciDevice, group: IommuGroup):
        super().__init__(kernel)
        self.device = device
        self.group = group
        # index -> (argsz needed, the reply after argsz when that fits, the chain, the whole
        # reply when it does not): the device's regions are fixed while this fd is open.
        self.region_replies: dict[int, tuple[int, bytearray, bytearray, bytearray]] = {}

    def ioctl(self, request: int, arg) -> int:
        handler = self.lockless.get(request)
        if handler is not None:
            return handler(self, arg)
        dev = self.device
        if request == uapi.VFIO_DEVICE_GET_IRQ_INFO:
            buf = _buf_arg(arg)
            layout = uapi.vfio_irq_info
            info = _unpack_min(layout, buf, layout.size)
            if info.argsz < layout.size:
                raise _err(errno.EINVAL, "argsz below vfio_irq_info")
            flags, count = dev.irq_info(info.index)
            layout.pack_into(buf, 0, argsz=info.argsz, flags=flags, index=info.index, count=count)
            return 0
        if request == uapi.VFIO_DEVICE_SET_IRQS:
            buf = _buf_arg(arg)
            _unpack_min(uapi.vfio_irq_set, buf, uapi.vfio_irq_set.size)
            return dev.set_irqs(buf)
        if request == uapi.VFIO_DEVICE_RESET:
            dev.reset()
            return 0
        if request == uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO:
            return self.hot_reset_info(_buf_arg(arg))
        return super().ioctl(request, arg)

    def get_info(self, arg) -> int:
        buf = _buf_arg(arg)
        dev = self.device
        layout = uapi.vfio_device_info
        minsz = layout.offsetof("num_irqs") + 4
        info = _unpack_min(layout, buf, minsz)
        if info.argsz < minsz:
            raise _err(errno.EINVAL, "argsz below vfio_device_info's minimum")
        out = layout.pack(argsz=info.argsz, flags=dev.flags, num_regions=dev.num_regions,
                          num_irqs=dev.num_irqs, cap_offset=0)
        self.copy_info_back(buf, out, info.argsz, minsz)
        return 0

    def copy_info_back(self, buf: bytearray, out: bytearray, argsz: int, minsz: int) -> None:
        _copy_back(buf, out, uapi.vfio_device_info, argsz, minsz)

    def get_region_info(self, arg) -> int:
        """vfio_pci_ioctl_get_region_info: the caller's argsz comes back when the capability chain
        fits after the struct (it is copied there), else the argsz it needs with cap_offset 0."""
        try:
            argsz, index = _ARGSZ_AND_INDEX.unpack_from(arg)
        except TypeError:
            raise _err(errno.EFAULT, "the ioctl takes a pointer to a struct") from None
        except struct.error:
            raise _err(errno.EFAULT, f"vfio_region_info buffer shorter than {_REGION_INFO_SIZE} bytes") from None
        try:
            needed, fits, chain, short = self.region_replies[index]
        except KeyError:
            needed, fits, chain, short = self.region_replies[index] = self.region_reply(index)
        if argsz < needed:
            if argsz < _REGION_INFO_SIZE:
                raise _err(errno.EINVAL, "argsz below vfio_region_info")
            arg[:_REGION_INFO_SIZE] = short
        else:
            arg[4:_REGION_INFO_SIZE] = fits
            if chain:
                arg[_REGION_INFO_SIZE:needed] = chain
        return 0

    def region_reply(self, index: int) -> tuple[int, bytearray, bytearray, bytearray]:
        """Packed once per region: bytearrays, because a bytearray slice assignment from a
        bytearray is a third of the cost of one from bytes."""
        flags, size, caps = self.device.region_info(index)
        offset = index << self.OFFSET_SHIFT
        pack = uapi.vfio_region_info.struct.pack
        if not caps:
            return _REGION_INFO_SIZE, bytearray(pack(0, flags, index, 0, size, offset)[4:]), bytearray(), bytearray()
        flags |= uapi.VFIO_REGION_INFO_FLAG_CAPS
        chain = uapi.build_chain(caps, _REGION_INFO_SIZE, "region")
        needed = _REGION_INFO_SIZE + len(chain)
        return (needed, bytearray(pack(0, flags, index, _REGION_INFO_SIZE, size, offset)[4:]), bytearray(chain),
                bytearray(pack(needed, flags, index, 0, size, offset)))

    def hot_reset_info(self, buf: bytearray) -> int:
        layout = uapi.vfio_pci_hot_reset_info
        info = _unpack_min(layout, buf, layout.size)
        if info.argsz < layout.size:
            raise _err(errno.EINVAL, "argsz below vfio_pci_hot_reset_info")
        affected = self.kernel.hot_reset_set(self.device.bdf)
        if affected is None:
            raise _err(errno.ENODEV, "no slot or bus reset for this device")
        entry = uapi.vfio_pci_dependent_device
        if info.argsz < layout.size + entry.size * len(affected):
            layout.pack_into(buf, 0, argsz=info.argsz, flags=0, count=len(affected))
            raise _err(errno.ENOSPC, f"{len(affected)} devices need more argsz")
        if len(buf) < layout.size + entry.size * len(affected):
            layout.pack_into(buf, 0, argsz=info.argsz, flags=0, count=len(affected))
            raise _err(errno.EFAULT, "argsz claims room for the devices the buffer does not have")
        for i, spec in enumerate(affected):
            dom, bus, devfn = _split_bdf(spec.bdf)
            entry.pack_into(buf, layout.size + i * entry.size, group_id=spec.group, segment=dom, bus=bus, devfn=devfn)
        layout.pack_into(buf, 0, argsz=info.argsz, flags=0, count=len(affected))
        return 0

    def release(self) -> None:
        self.device.close_device()
        self.group.device_fds -= 1
        opened = self.group.opened
        if opened is not None and opened.released and not self.group.device_fds:
            opened.finish_release()


class PlatformDeviceFile(DeviceFile):
    """A vfio-platform device fd: vfio_platform_ioctl's argsz rules, which echo more than vfio-pci's."""

    def ioctl(self, request: int, arg) -> int:
        if request == uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO:
            return File.ioctl(self, request, arg)
        return super().ioctl(request, arg)

    def copy_info_back(self, buf: bytearray, out: bytearray, argsz: int, minsz: int) -> None:
        """vfio_platform_ioctl copies back minsz only, whatever argsz says."""
        buf[:minsz] = out[:minsz]

    def get_region_info(self, arg) -> int:
        """No capability chains: the caller's argsz and cap_offset come back as they went in."""
        layout = uapi.vfio_region_info
        buf = _buf_arg(arg)
        info = _unpack_min(layout, buf, layout.size)
        if info.argsz < layout.size:
            raise _err(errno.EINVAL, "argsz below vfio_region_info")
        flags, size = self.device.region_info(info.index)
        layout.pack_into(buf, 0, argsz=info.argsz, flags=flags, index=info.index, cap_offset=info.cap_offset,
                         size=size, offset=info.index << 40)
        return 0


class CcwDeviceFile(PlatformDeviceFile):
    """A vfio-ccw mdev fd: vfio_ccw_mdev_ioctl copies back what vfio-platform's does, but its
    regions sit at index << 10 and all but the I/O region carry a type capability."""

    OFFSET_SHIFT = CCW_OFFSET_SHIFT

    def get_region_info(self, arg) -> int:
        """vfio-pci's capability rules; a region with no capability leaves cap_offset as it came."""
        layout = uapi.vfio_region_info
        buf = _buf_arg(arg)
        cap_offset = _unpack_min(layout, buf, layout.size).cap_offset
        DeviceFile.get_region_info(self, buf)
        if not layout.unpack(buf).flags & uapi.VFIO_REGION_INFO_FLAG_CAPS:
            struct.pack_into("=I", buf, layout.offsetof("cap_offset"), cap_offset)
        return 0


MMIO_WINDOW = 0xFE000000
IO_WINDOW = 0xC000


def _firmware(specs: list[PciDeviceSpec], functions: dict[str, pci.PciFunction]) -> None:
    """What SeaBIOS and Linux leave behind: BARs placed, decode enabled, the IRQ line routed.

    A topology may give the addresses the real runner's firmware chose (its edu reads COMMAND
    0x0103 and BAR0 0xfe400000); other BARs are packed into the memory and I/O windows.
    """
    next_free = {False: MMIO_WINDOW, True: IO_WINDOW}
    for spec in specs:
        fn = functions[spec.bdf]
        for index, bar in enumerate(fn.bars):
            if bar is None:
                continue
            io = bar.kind == pci.BAR_IO
            base = spec.bars.get(index)
            if base is None:
                base = (next_free[io] + bar.size - 1) & ~(bar.size - 1)
                next_free[io] = base + bar.size
            off = pci.PCI_BASE_ADDRESS_0 + 4 * index
            struct.pack_into("<I", fn.config, off, (base & 0xFFFFFFF0) | bar.flags)
        fn.config[pci.PCI_INTERRUPT_LINE] = spec.interrupt_line
        fn.config_write(pci.PCI_COMMAND, 2, pci.PCI_COMMAND_IO | pci.PCI_COMMAND_MEMORY | pci.PCI_COMMAND_SERR)


def _split_bdf(bdf: str) -> tuple[int, int, int]:
    dom, bus, rest = bdf.split(":")
    slot, fn = rest.split(".")
    return int(dom, 16), int(bus, 16), (int(slot, 16) << 3) | int(fn, 16)


def _int_arg(arg) -> int:
    return arg if isinstance(arg, int) else 0


def _buf_arg(arg) -> bytearray:
    if isinstance(arg, int):
        raise _err(errno.EFAULT, "the ioctl takes a pointer to a struct")
    return arg


def _copy_back(buf: bytearray, out: bytearray, layout, argsz: int, minsz: int) -> None:
    """copy_to_user of the reply: cap_offset is written only when the caller's argsz reaches it."""
    end = layout.offsetof("cap_offset") + 4
    n = end if argsz >= end else minsz
    buf[:n] = out[:n]


def _unpack_min(layout, buf: bytearray, minsz: int):
    """Read what copy_from_user would: EFAULT when the buffer is shorter than the kernel's minsz."""
    if len(buf) < minsz:
        raise _err(errno.EFAULT, f"{layout.name} buffer shorter than {minsz} bytes")
    if len(buf) < layout.size:
        return layout.unpack(bytes(buf) + bytes(layout.size - len(buf)))
    return layout.unpack(buf)


def _not_vfio(fd: int) -> OSError:
    """What Linux answers a VFIO request on a fd that is not a VFIO file: EBADF when it is not
    open at all, ENOTTY when it is some other file."""
    return _err(errno.EBADF if not _is_open(fd) else errno.ENOTTY, f"fd {fd} is not a VFIO file")


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


class FakeKernel(EventfdMixin):
    """A Linux VFIO kernel in one process: /dev/vfio, sysfs, vfio-pci, type1, emulated devices."""

    kind = "fake"

    def __init__(self, topology: Topology | str | None = None, profile: Profile | str | None = None):
        if isinstance(topology, str):
            topology = Topology.named(topology)
        self.topology = topology or Topology.default()
        self.profile = profile if isinstance(profile, Profile) else Profile.named(profile or "6.1")
        self._host_side = ExitStack()
        try:
            self.functions = {d.bdf: _devices.CATALOG[d.model](**self._options(d)) for d in self.topology.devices}
        except BaseException:
            self._host_side.close()
            raise
        _firmware(self.topology.devices, self.functions)
        self.sysfs = Sysfs(self.topology, self.functions)
        self.fs = self.sysfs.fs
        self._os = fake_os.FakeOsModule(self.fs)
        self._open = fake_open.FakeFileOpen(self.fs)
        self.files: dict[int, File] = {}
        self.groups = {n: IommuGroup(n) for n in self.topology.groups()}
        self.vfio_devices = {bdf: VfioPciDevice(self, fn, bdf) for bdf, fn in self.functions.items()}
        self.platform_devices = {d.name: VfioPlatformDevice(self, _devices.CATALOG[d.model](), d.name)
                                 for d in self.topology.platform}
        self.ccw_devices = {d.schid: VfioCcwDevice(self, d, _devices.CATALOG[d.model]()) for d in self.topology.ccw}
        self._mappings: list[weakref.ref] = []
        self._iommu_faults: list[IOMMUFault] = []
        self._lock = threading.RLock()
        self._virqfd: _Virqfd | None = None
        self.faults = Faults(self)
        for fn in self.functions.values():
            fn.start(self.watch)

    def _options(self, spec: PciDeviceSpec) -> dict:
        """A doorbell that names no server gets one of its own, as the CI VM's host runs one before
        QEMU: a socket in a temporary directory and 1 MiB of memfd memory, gone at close_all()."""
        if spec.model != "ivshmem-doorbell" or "chardev" in spec.options:
            return spec.options
        from vfio_impl.ivshmem_server import IvshmemServer

        path = os.path.join(self._host_side.enter_context(tempfile.TemporaryDirectory(prefix="ivshmem-")), "socket")
        self._host_side.enter_context(IvshmemServer(path, size=IVSHMEM_SHM_SIZE, vectors=spec.options.get("vectors", 1)))
        return {**spec.options, "chardev": path}

    # -- Host: files --------------------------------------------------------------------------
    def _install(self, f: File) -> int:
        self.files[f.fd] = f
        return f.fd

    def locked(self, fn: Callable, *args):
        """fn(*args) under the kernel lock, taken by hand: on 3.11 a `with` costs two to three
        times as much, and every test's syscalls come through here."""
        lock = self._lock
        lock.acquire()
        try:
            return fn(*args)
        finally:
            lock.release()

    def open(self, path: str, flags: int = os.O_RDWR) -> int:
        with self._lock:
            if not self._os.path.exists(path):
                raise _err(errno.ENOENT, path)
            if path == "/dev/vfio/vfio":
                return self._install(ContainerFile(self))
            m = _GROUP_RE.match(path)
            if not m:
                raise _err(errno.ENXIO, f"{path} is not a device the fake kernel drives")
            group = self.groups[int(m.group(1))]
            if group.opened is not None:
                raise _err(errno.EBUSY, f"group {group.number} is already open")
            f = GroupFile(self, group)
            group.opened = f
            return self._install(f)

    def close(self, fd: int) -> None:
        with self._lock:
            f = self.files.pop(fd, None)
            if f is None:
                os.close(fd)
                return
            os.close(f.fd)
            f.release()
            if isinstance(f, ContainerFile):
                f.closed = True
                self._maybe_free_container(f)

    def _maybe_free_container(self, container: ContainerFile) -> None:
        """Groups keep a container alive after its fd is closed; the last one frees it."""
        if container.closed and not container.groups and container.iommu is not None:
            container.iommu.unmap_all()
            container.iommu = None

    def _file(self, fd: int) -> File:
        f = self.files.get(fd)
        if f is None:
            raise _not_vfio(fd)
        return f

    def ioctl(self, fd: int, request: int, arg: int | bytearray | bytes = 0) -> int:
        """Immutable bytes go in as a copy, as RealHost passes them: the answer is not seen."""
        if isinstance(arg, bytes):
            arg = bytearray(arg)
        f = self.files.get(fd)
        if f is None:
            raise _not_vfio(fd)
        handler = f.lockless.get(request)
        if handler is not None:
            return handler(f, arg)
        return self.locked(f.ioctl, request, arg)

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        """A negative offset is EINVAL before any driver sees it (rw_verify_area)."""
        f = self.files.get(fd)
        if f is None:
            return os.pread(fd, n, offset)
        if not isinstance(f, DeviceFile) or offset < 0:
            raise _err(errno.EINVAL, f"read on a {f.kind} at {offset}")
        if n == 0:
            return b""
        return self.locked(f.device.rw, offset, None, n)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        f = self.files.get(fd)
        if f is None:
            return os.pwrite(fd, data, offset)
        if not isinstance(f, DeviceFile) or offset < 0:
            raise _err(errno.EINVAL, f"write on a {f.kind} at {offset}")
        if not data:
            return 0
        return self.locked(f.device.rw, offset, bytes(data), len(data))

    def mmap(self, fd: int, length: int, offset: int, prot: int = _mmap.PROT_READ | _mmap.PROT_WRITE):
        with self._lock:
            f = self._file(fd)
            if not isinstance(f, DeviceFile):
                raise _err(errno.ENODEV if isinstance(f, GroupFile) else errno.EINVAL, f"mmap of a {f.kind}")
            if offset % PAGE_SIZE:
                raise _err(errno.EINVAL, "mmap offset not page aligned")
            m = f.device.mmap(offset, length, prot)
            self._mappings.append(weakref.ref(m))
            return m

    def live_mappings(self) -> int:
        """mmaps handed out and not yet closed: leaks show up here."""
        self._mappings = [r for r in self._mappings if r() is not None and not r().closed]
        return len(self._mappings)

    # -- Host: sysfs --------------------------------------------------------------------------
    def readlink(self, path: str) -> str:
        return self._os.readlink(path)

    def exists(self, path: str) -> bool:
        return self._os.path.exists(path)

    def listdir(self, path: str) -> list[str]:
        return sorted(self._os.listdir(path))

    def read_text(self, path: str) -> str:
        with self._open(path) as f:
            return f.read()

    def write_text(self, path: str, text: str) -> None:
        with self._lock:
            if not self._os.path.exists(path):
                raise _err(errno.ENOENT, path)
            if path.endswith("/driver_override"):
                with self._open(path, "w") as f:
                    f.write(text.strip() + "\n" if text.strip() else "(null)\n")
                return
            m = re.match(r"^/sys/bus/pci/drivers/([^/]+)/(bind|unbind)$", path)
            if not m:
                raise _err(errno.EACCES, f"{path} is read-only in the fake sysfs")
            spec = self._spec(text.strip())
            if m.group(2) == "unbind":
                if spec.driver != m.group(1):
                    raise _err(errno.ENODEV, f"{spec.bdf} is not bound to {m.group(1)}")
                self._unbind(spec)
            else:
                if spec.driver:
                    raise _err(errno.EBUSY, f"{spec.bdf} is bound to {spec.driver}")
                self.sysfs.set_driver(spec, m.group(1))

    def _spec(self, bdf: str) -> PciDeviceSpec:
        spec = next((d for d in self.topology.devices if d.bdf == bdf), None)
        if spec is None:
            raise _err(errno.ENODEV, f"no PCI device {bdf}")
        return spec

    def _unbind(self, spec: PciDeviceSpec) -> None:
        group = self.groups.get(spec.group)
        if spec.driver == "vfio-pci" and group and group.device_fds and self.vfio_devices[spec.bdf].open_count:
            raise _err(errno.EBUSY, f"{spec.bdf} is in use through VFIO")
        self.sysfs.set_driver(spec, None)

    # -- kernel internals used by the drivers -------------------------------------------------
    def group_of(self, bdf: str) -> IommuGroup | None:
        spec = self._spec(bdf)
        return self.groups.get(spec.group) if spec.group is not None else None

    def platform_device(self, name: str) -> VfioPlatformDevice:
        """The vfio-platform state of a device (its model is `.model`), for tests to look into."""
        return self.platform_devices[name]

    def ccw_device(self, schid: str) -> VfioCcwDevice:
        """The vfio_ccw state of a subchannel (its hardware is `.subchannel`), for tests."""
        return self.ccw_devices[schid]

    def hot_reset_set(self, bdf: str) -> list[PciDeviceSpec] | None:
        """Functions a bus reset would hit; none on the root bus, as on q35's bus 0."""
        bus = bdf[:7]
        if bus.endswith(":00"):
            return None
        return [d for d in self.topology.devices if d.bdf[:7] == bus and d.group is not None]

    def virqfd_add(self, ctx, handler: Callable[[], None]) -> None:
        def fire() -> None:
            if ctx.fd >= 0 and ctx.clear():
                handler()

        self.watch(ctx.fd, fire)

    def virqfd_remove(self, ctx) -> None:
        self.watch(ctx.fd, None)

    def watch(self, fd: int, callback: Callable[[], None] | None) -> None:
        """The kernel's worker runs `callback` under the kernel lock whenever `fd` is readable
        (None stops watching); virqfds and devices that serve a socket or eventfds use it."""
        if self._virqfd is None:
            if callback is None:
                return
            self._virqfd = _Virqfd(self._lock)
        self._virqfd.watch(fd, callback)

    def watched(self) -> int:
        """fds the kernel's worker watches (virqfds, device sockets and eventfds)."""
        return self._virqfd.watched() if self._virqfd else 0

    def iommu_faults(self) -> list[IOMMUFault]:
        """Every DMA a type1 IOMMU of this kernel refused, oldest first, kept after its container
        is gone: what Linux's DMAR fault lines in dmesg tell. Each was also a WARNING on the
        `fakekernel.iommu` logger."""
        return list(self._iommu_faults)

    def open_files(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for f in self.files.values():
            counts[f.kind] = counts.get(f.kind, 0) + 1
        return counts

    def close_all(self) -> None:
        """Close every fake fd (devices first), stop the virqfd thread and free BAR memory."""
        self.faults.clear()
        with self._lock:
            for kind in (DeviceFile, GroupFile, ContainerFile):
                for fd in [fd for fd, f in self.files.items() if isinstance(f, kind)]:
                    self.close(fd)
            for dev in (*self.vfio_devices.values(), *self.platform_devices.values(), *self.ccw_devices.values()):
                dev.release()
            for fn in self.functions.values():
                fn.stop()
        if self._virqfd:
            self._virqfd.stop()
            self._virqfd = None
        self._host_side.close()

    def __enter__(self) -> "FakeKernel":
        return self

    def __exit__(self, *exc) -> None:
        self.close_all()


class _Virqfd:
    """The kernel's worker: runs a handler when a user writes an unmask eventfd, or when a
    device's socket or eventfd has something to read."""

    def __init__(self, lock: threading.RLock):
        self._lock = lock
        self._sel = selectors.DefaultSelector()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._sel.register(self._wake, selectors.EVENT_READ, None)
        self._running = True
        self._thread = threading.Thread(target=self._run, name="fake-virqfd", daemon=True)
        self._thread.start()

    def watch(self, fd: int, callback) -> None:
        try:
            self._sel.unregister(fd)
        except (KeyError, ValueError):
            pass
        if callback is not None:
            self._sel.register(fd, selectors.EVENT_READ, callback)
        os.eventfd_write(self._wake, 1)

    def watched(self) -> int:
        return len(self._sel.get_map()) - 1

    def _run(self) -> None:
        while self._running:
            for key, _ in self._sel.select():
                if key.data is None:
                    try:
                        os.eventfd_read(self._wake)
                    except BlockingIOError:
                        pass
                    continue
                with self._lock:
                    key.data()

    def stop(self) -> None:
        self._running = False
        os.eventfd_write(self._wake, 1)
        self._thread.join()
        self._sel.close()
        os.close(self._wake)
