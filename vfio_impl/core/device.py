"""A VFIO device fd: info, regions, IRQ info and signalling, reset; the part every bus shares."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Callable

from vfio_impl import uapi
from vfio_impl.core import irq
from vfio_impl.core.container import AddressSpace, Group
from vfio_impl.core.errors import VFIOError
from vfio_impl.core.iommu import IOMMUBackend, IOMMUGroupError, iommu_group
from vfio_impl.core.region import Region, RegionInfo
from vfio_impl.core.trace import trace


@dataclass(slots=True, frozen=True)
class IRQInfo:
    index: int
    flags: int
    count: int

    @property
    def automasked(self) -> bool:
        return bool(self.flags & uapi.VFIO_IRQ_INFO_AUTOMASKED)


class Device:
    """Got through the address space's IOMMU backend; closing it releases regions, interrupts and
    what the backend holds for it (for type1, the group reference)."""

    def __init__(self, space: AddressSpace, name: str, sysfsdev: str):
        self.space = space
        self.host = space.host
        self.name = name
        self.sysfsdev = sysfsdev
        self.fd = -1
        self.container: IOMMUBackend | None = None
        self.group: Group | None = None     # type1's; a device of another backend has none
        self.flags = 0
        self.num_regions = 0
        self.num_irqs = 0
        self.regions: dict[int, Region] = {}
        self.eventfds: set[int] = set()

    @classmethod
    def attach(cls, space: AddressSpace, sysfsdev: str, name: str | None = None, *, groupid: int | None = None,
               devname: str | None = None, already_attached: str | None = None,
               populate: Callable[["Device"], None] | None = None) -> "Device":
        """vfio_device_attach, the one way a flavour gets a device. A flavour that found the IOMMU
        group itself passes `groupid`, and its words for a second attach; without them the group
        is found, and its failures and the device's worded, as vfio-pci's seed does. `devname` is
        the kernel's name for the device when the flavour calls it something else (a ccw mdev, by
        its subchannel). `populate` reads what the flavour needs of the new device as part of
        getting it, as the seed's vfio_get_device reads the PCI regions."""
        name = name or os.path.basename(sysfsdev.rstrip("/"))
        devname = devname or name
        already_attached = already_attached or f"vfio: error: device {name} is already attached"
        if groupid is not None:
            cls._refuse_second_attach(space, name, already_attached)
            return cls._get(space, sysfsdev, name, devname, groupid, populate)
        if not space.host.exists(sysfsdev):
            raise VFIOError(f"vfio: error: no such host device: {sysfsdev}", errno.ENOENT)
        try:
            groupid = iommu_group(space.host, sysfsdev)
        except IOMMUGroupError as e:
            raise VFIOError("vfio: error no iommu_group for device", e.errno) from e
        except VFIOError as e:
            raise VFIOError(f"vfio: error reading {sysfsdev}/iommu_group", e.errno) from e
        cls._refuse_second_attach(space, name, already_attached)
        try:
            return cls._get(space, sysfsdev, name, devname, groupid, populate)
        except IOMMUGroupError as e:
            raise VFIOError(f"vfio: failed to get group {groupid}: {e.message}", e.errno) from e
        except VFIOError as e:
            raise VFIOError(f"vfio: failed to get device {name}: {e.message}", e.errno) from e

    @staticmethod
    def _refuse_second_attach(space: AddressSpace, name: str, message: str) -> None:
        if any(d.name == name for d in space.devices):
            raise VFIOError(message, errno.EBUSY)

    @classmethod
    def _get(cls, space: AddressSpace, sysfsdev: str, name: str, devname: str, groupid: int,
             populate: Callable[["Device"], None] | None) -> "Device":
        """Have the space's backend give the device its fd, read its info, let the flavour populate
        it; a failure closes what was got."""
        device = cls(space, name, sysfsdev)
        space.iommu.attach_device(space, device, devname, groupid)
        space.devices.append(device)
        try:
            device._get_info()
            if populate:
                populate(device)
        except BaseException:
            device.close()
            raise
        trace("vfio_get_device", name=name, flags=device.flags, num_regions=device.num_regions,
              num_irqs=device.num_irqs)
        return device

    def _get_info(self) -> None:
        buf = uapi.vfio_device_info.pack()
        try:
            self.host.ioctl(self.fd, uapi.VFIO_DEVICE_GET_INFO, buf)
        except OSError as e:
            raise VFIOError.from_oserror("vfio: error getting device info", e) from e
        info = uapi.vfio_device_info.unpack(buf)
        self.flags, self.num_regions, self.num_irqs = info.flags, info.num_regions, info.num_irqs

    @property
    def reset_works(self) -> bool:
        return bool(self.flags & uapi.VFIO_DEVICE_FLAGS_RESET)

    # -- regions ------------------------------------------------------------------------------
    def get_region_info(self, index: int) -> RegionInfo:
        """Ask with the fixed size first; grow to the argsz the kernel asks for to get the caps."""
        layout = uapi.vfio_region_info
        buf = layout.pack(index=index)
        for _ in range(2):
            try:
                self.host.ioctl(self.fd, uapi.VFIO_DEVICE_GET_REGION_INFO, buf)
            except OSError as e:
                raise VFIOError.from_oserror(f"vfio: Error getting region {index} info", e) from e
            info = layout.unpack(buf)
            if info.argsz <= len(buf):
                break
            buf = bytearray(info.argsz)
            layout.pack_into(buf, 0, argsz=info.argsz, index=index)
        caps = ()
        if info.flags & uapi.VFIO_REGION_INFO_FLAG_CAPS and info.cap_offset:
            caps = tuple(uapi.parse_chain(buf, info.cap_offset, "region"))
        return RegionInfo(index, info.flags, info.size, info.offset, caps)

    def get_dev_region_info(self, type_: int, subtype: int) -> RegionInfo | None:
        """vfio_get_dev_region_info: the first region whose type capability matches; regions
        whose info cannot be read or that carry no type are passed over."""
        for index in range(self.num_regions):
            try:
                info = self.get_region_info(index)
            except VFIOError:
                continue
            cap = info.cap(uapi.RegionTypeCap)
            if cap is None:
                continue
            trace("vfio_get_dev_region", name=self.name, index=index, type=cap.type, subtype=cap.subtype)
            if (cap.type, cap.subtype) == (type_, subtype):
                return info
        return None

    def region(self, index: int) -> Region:
        if index not in self.regions:
            self.regions[index] = Region(self, self.get_region_info(index))
        return self.regions[index]

    # -- interrupts ---------------------------------------------------------------------------
    def get_irq_info(self, index: int) -> IRQInfo:
        buf = uapi.vfio_irq_info.pack(index=index)
        try:
            self.host.ioctl(self.fd, uapi.VFIO_DEVICE_GET_IRQ_INFO, buf)
        except OSError as e:
            raise VFIOError.from_oserror(f"vfio: error getting device {self.name} irq {index} info", e) from e
        info = uapi.vfio_irq_info.unpack(buf)
        return IRQInfo(index, info.flags, info.count)

    def set_irqs(self, buf: bytearray) -> int:
        return self.host.ioctl(self.fd, uapi.VFIO_DEVICE_SET_IRQS, buf)

    def set_irq_signaling(self, index: int, subindex: int, action: int, fd: int) -> None:
        """Wire (fd >= 0) or unwire (fd -1) one vector's eventfd for an action."""
        try:
            self.set_irqs(irq.eventfds(index, subindex, [fd], action))
        except OSError as e:
            raise VFIOError.from_oserror(
                f"vfio: failed to {'set' if fd >= 0 else 'tear down'} signaling of irq {index}.{subindex}", e) from e
        trace("vfio_set_irq_signaling", name=self.name, index=index, subindex=subindex, action=action, fd=fd)

    def enable_irq(self, index: int, fds: list[int]) -> None:
        """Wire fds[n] to vector n of the index in one SET_IRQS (rust-vmm's enable_irq): MSI and
        MSI-X need it, since the first TRIGGER fixes how many vectors the kernel enables and a
        later one beyond them is EINVAL. An fd of -1 leaves its vector unwired."""
        try:
            self.set_irqs(irq.eventfds(index, 0, fds))
        except OSError as e:
            raise VFIOError.from_oserror(f"vfio: failed to enable {len(fds)} vectors of irq {index}", e) from e
        trace("vfio_enable_irq", name=self.name, index=index, fds=tuple(fds))

    def _irq_action(self, index: int, action: int, what: str, subindex: int = 0) -> None:
        try:
            self.set_irqs(irq.data_none(index, subindex, 1, action))
        except OSError as e:
            raise VFIOError.from_oserror(f"vfio: failed to {what} irq {index}.{subindex}", e) from e

    def mask_irq(self, index: int) -> None:
        self._irq_action(index, uapi.VFIO_IRQ_SET_ACTION_MASK, "mask")

    def unmask_irq(self, index: int) -> None:
        self._irq_action(index, uapi.VFIO_IRQ_SET_ACTION_UNMASK, "unmask")

    def trigger_irq(self, index: int, subindex: int = 0) -> None:
        """Loopback: have the kernel signal the vector's eventfd, for testing the wiring."""
        self._irq_action(index, uapi.VFIO_IRQ_SET_ACTION_TRIGGER, "trigger", subindex)

    def disable_irq(self, index: int) -> None:
        try:
            self.set_irqs(irq.data_none(index, 0, 0, uapi.VFIO_IRQ_SET_ACTION_TRIGGER))
        except OSError as e:
            raise VFIOError.from_oserror(f"vfio: failed to disable irq {index}", e) from e

    def new_eventfd(self) -> int:
        try:
            fd = self.host.eventfd()
        except OSError as e:
            raise VFIOError.from_oserror("vfio: failed to create an eventfd", e) from e
        self.eventfds.add(fd)
        return fd

    def free_eventfd(self, fd: int) -> None:
        if fd in self.eventfds:
            self.eventfds.discard(fd)
            self.space.machine.set_fd_handler(fd, None)
            self.host.close(fd)

    # -- reset / close ------------------------------------------------------------------------
    def reset(self) -> None:
        try:
            self.host.ioctl(self.fd, uapi.VFIO_DEVICE_RESET, 0)
        except OSError as e:
            raise VFIOError.from_oserror(f"vfio: Error unable to reset physical device ({self.name})", e) from e
        trace("vfio_device_reset", name=self.name)

    def close(self) -> None:
        """Reverse of attach: regions, eventfds, then the backend lets go of the device fd."""
        if self.fd < 0:
            return
        for region in self.regions.values():
            region.close()
        self.regions.clear()
        for fd in list(self.eventfds):
            self.free_eventfd(fd)
        self.space.devices.remove(self)
        self.container.detach_device(self)
        trace("vfio_put_device", name=self.name)

    def __enter__(self) -> "Device":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
