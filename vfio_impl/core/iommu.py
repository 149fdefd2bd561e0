"""The IOMMU backend seam: how an address space gets a device its fd and maps memory for its DMA,
whichever interface the kernel offers. Type1 through a group and a container (container.py) is the
first backend; iommufd through the device cdev and no-IOMMU mode go behind the same class, so a
flavour never knows which one it runs on."""

from __future__ import annotations

import errno
import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vfio_impl.core.errors import VFIOError
from vfio_impl.core.host import Host
from vfio_impl.core.trace import error_report, trace

if TYPE_CHECKING:
    from vfio_impl.core.container import AddressSpace
    from vfio_impl.core.device import Device
    from vfio_impl.vmm.machine import RAMArea

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# readlink into a PATH_MAX buffer: a link that fills it is too long to trust.
PATH_MAX = 4096
# What sscanf("%d") takes from the front of a string.
_SCANF_INT = re.compile(r"\s*[+-]?\d+")


class IOMMUGroupError(VFIOError):
    """No usable IOMMU group: its sysfs link is missing, or the group cannot be got. A type of its
    own because vfio-pci's seed words these failures itself (Device.attach)."""


def iommu_group(host: Host, sysfsdev: str) -> int:
    """The IOMMU group number of a sysfs device, as QEMU reads it: readlink of its iommu_group into
    a PATH_MAX buffer, then sscanf("%d") of the link's last component."""
    try:
        link = host.readlink(f"{sysfsdev}/iommu_group")
    except OSError as e:
        raise IOMMUGroupError.from_oserror("no iommu_group found", e) from e
    if len(link.encode()) >= PATH_MAX:
        raise IOMMUGroupError("no iommu_group found", errno.ENAMETOOLONG)
    number = _SCANF_INT.match(os.path.basename(link))
    if not number:
        # sscanf leaves errno alone, so QEMU reports whatever errno held; EINVAL says why.
        raise VFIOError(f"failed to read {link}", errno.EINVAL)
    return int(number.group())


@dataclass(slots=True, frozen=True)
class IOMMUInfo:
    """What an IOMMU context offers: its page sizes, and in `caps` its IOVA ranges and DMA limits."""

    flags: int
    iova_pgsizes: int
    caps: tuple

    def cap(self, cls):
        return next((c for c in self.caps if isinstance(c, cls)), None)


class IOMMUBackend(ABC):
    """QEMU's VFIOContainerBase with its VFIOIOMMUClass, rust-vmm's VfioOps. The class attaches
    devices (an AddressSpace holds the one it attaches with, `space.iommu`); an instance is one
    IOMMU context the memory listener fills (a type1 container, an iommufd IOAS), kept in
    `space.containers`. Dirty page tracking (set_dirty_page_tracking, query_dirty_bitmap) and
    pci_hot_reset are the backend's too, and come here with migration and hot reset."""

    @classmethod
    @abstractmethod
    def attach_device(cls, space: AddressSpace, device: Device, devname: str, groupid: int) -> None:
        """Give `device` the fd the kernel has for `devname` (its `fd`) and the context of `space`
        it DMAs through (its `container`): one already there, or a new one that joins
        space.containers and the machine's memory listeners. `groupid` is the IOMMU group sysfs
        names for the device. A failure leaves nothing behind."""

    @abstractmethod
    def detach_device(self, device: Device) -> None:
        """The reverse of attach_device: the device fd is closed, and what only it held goes."""

    @abstractmethod
    def map_dma(self, iova: int, size: int, vaddr: int, readonly: bool = False) -> None:
        """Let the devices reach the process memory at `vaddr` at `iova`."""

    @abstractmethod
    def unmap_dma(self, iova: int, size: int) -> int:
        """The number of bytes unmapped."""

    @abstractmethod
    def get_info(self) -> IOMMUInfo:
        """Where a DMA mapping may go: page sizes and IOVA ranges."""

    # -- memory listener ----------------------------------------------------------------------
    def region_add(self, area: RAMArea) -> None:
        """Map guest RAM for DMA, whole pages only. A section that cannot be mapped is reported
        and skipped, as the seed's listener does: the machine and later containers go on."""
        if area.gpa % PAGE_SIZE != area.vaddr % PAGE_SIZE:
            error_report("vfio_listener_region_add received unaligned region")
            return
        iova, end = _page_range(area)
        if iova >= end:
            return
        try:
            self.map_dma(iova, end - iova, area.vaddr + (iova - area.gpa), area.readonly)
        except VFIOError as e:
            _report_failed(e)

    def region_del(self, area: RAMArea) -> None:
        if area.gpa % PAGE_SIZE != area.vaddr % PAGE_SIZE:
            error_report("vfio_listener_region_del received unaligned region")
            return
        iova, end = _page_range(area)
        if iova >= end:
            return
        try:
            self.unmap_dma(iova, end - iova)
        except VFIOError as e:
            _report_failed(e)


def _report_failed(e: VFIOError) -> None:
    """The listener's report of a refused map or unmap: the call, then -errno and its text."""
    error_report(f"{e.message} = {-e.errno} ({os.strerror(e.errno)})")


def _page_range(area: RAMArea) -> tuple[int, int]:
    """The whole pages inside a RAM area: the IOMMU maps nothing smaller."""
    return (area.gpa + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1), (area.gpa + area.size) & ~(PAGE_SIZE - 1)
