"""The VFIO core's files (drivers/vfio/vfio_main.c): what every VFIO fd is, and the device fd.

The device fd answers what every bus answers alike (GET_INFO, GET_REGION_INFO, GET_IRQ_INFO,
SET_IRQS, RESET, read, write, mmap) by asking the bus driver's VfioDevice, as vfio_device_fops
calls device->ops; it knows no bus. A bus driver (vfio_pci.py, vfio_platform.py, vfio_ccw.py)
subclasses VfioDevice, and its device joins its IOMMU group's list, where GET_DEVICE_FD finds it.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import TYPE_CHECKING, Callable

from vfio_impl import uapi

from .err import error
from .uaccess import buf_arg, copy_from_user, copy_to_user

if TYPE_CHECKING:
    from .group import IommuGroup
    from .iommu import Type1IOMMU
    from .kernel import FakeKernel

# Region N starts at N << 40 in the device fd: vfio-pci's layout (vfio_pci_core.h), which
# vfio-platform repeats; vfio-ccw packs its small regions closer (VfioDevice.offset_shift).
VFIO_PCI_OFFSET_SHIFT = 40
VFIO_PCI_OFFSET_MASK = (1 << VFIO_PCI_OFFSET_SHIFT) - 1
REGION_INFO_SIZE = uapi.vfio_region_info.size
_FLAGS = uapi.vfio_region_info.offsetof("flags")
_CAP_OFFSET = uapi.vfio_region_info.offsetof("cap_offset")
_CAP_NEXT = struct.Struct("=I")
_CAP_NEXT_OFFSET = uapi.vfio_info_cap_header.offsetof("next")
# argsz and index, unpacked from the whole struct so a short buffer fails as copy_from_user does.
_ARGSZ_AND_INDEX = struct.Struct(f"=I{uapi.vfio_region_info.offsetof('index') - 4}xI"
                                 f"{REGION_INFO_SIZE - uapi.vfio_region_info.offsetof('index') - 4}x")


class File:
    """An open fake file; `fd` is a real placeholder fd so numbers stay unique in the process."""

    kind = "file"
    # Requests whose answer reads only what was fixed at open, with their handlers: Linux takes
    # no lock for them, and neither does the fake, which calls the handler straight from
    # FakeKernel.ioctl, so a test asking for them pays no more than a syscall.
    lockless: dict[int, Callable] = {}

    def __init__(self, kernel: "FakeKernel"):
        self.kernel = kernel
        self.fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)

    def ioctl(self, request: int, arg) -> int:
        raise error(errno.ENOTTY, f"unknown ioctl {request:#x} on a {self.kind}")

    def release(self) -> None:
        pass


def info_cap_chain(caps, start: int, kind: str, align: int) -> bytes:
    """A GET_INFO capability chain placed at `start`, as vfio_info_cap_add builds it: each
    capability after the last, its size rounded up to `align` (the profile's info_cap_align),
    and each `next` the offset of the one after it."""
    chain = bytearray()
    last = None
    for cap in caps:
        if last is not None:
            _CAP_NEXT.pack_into(chain, last + _CAP_NEXT_OFFSET, start + len(chain))
        last = len(chain)
        body = uapi.build_chain([cap], start, kind)
        chain += body + bytes(-len(body) % align)
    return bytes(chain)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


class VfioDevice:
    """A device bound to a VFIO bus driver, as struct vfio_device with its vfio_device_ops.

    A driver provides what the device fd asks: `flags`, `num_regions` and `num_irqs` (GET_INFO),
    `region_info(index)` -> (flags, size, caps), fixed while a device fd is open (GET_REGION_INFO),
    `irq_info(index)` -> (flags, count), `set_irqs(buf)`, `reset()`, `rw(offset, data, count)` and
    `mmap(offset, length, prot)`; `open_device()` and `close_device()` on the first open and the
    last close, `release()` when the kernel goes. Where its ABI differs from vfio-pci's, it says
    so in the class attributes below, and requests of its own go to `ioctl`.
    """

    driver = ""  # its name under /sys/bus/*/drivers, which the topology binds devices to
    offset_shift = VFIO_PCI_OFFSET_SHIFT
    # vfio-pci answers cap_offset 0 where it has no capability chain; vfio-platform and vfio-ccw
    # copy their reply over the caller's struct only up to minsz, so cap_offset stays as it came.
    echoes_cap_offset = False
    # An mdev driver registers its device with vfio_register_emulated_iommu_dev: its group has
    # no IOMMU domain, and type1 then answers as a container with no domain does.
    emulated_iommu = False

    def __init__(self, kernel: "FakeKernel", spec, name: str):
        """vfio_register_group_dev: the device joins its group's list."""
        self.kernel = kernel
        self.spec = spec
        self.name = name
        self.open_count = 0
        self.resets = 0
        group = kernel.groups.get(spec.group)
        if group is not None:
            group.devices.append(self)

    def bound(self) -> bool:
        """Whether the device is bound to this driver now (sysfs bind and unbind move it)."""
        return self.spec.driver == self.driver

    def match(self, name: str) -> bool:
        """vfio_device_get_from_name without ops->match: the device's name, exactly."""
        return name == self.name

    def iommu(self) -> "Type1IOMMU | None":
        """The type1 IOMMU the device's DMA goes through (vfio_dma_rw, vfio_pin_pages); None
        while its group's container has none."""
        group = self.kernel.groups.get(self.spec.group)
        container = group.container if group else None
        return container.iommu if container is not None else None

    def ioctl(self, request: int, arg) -> int:
        raise error(errno.ENOTTY, f"unknown ioctl {request:#x} on a {self.driver} device")


class DeviceFile(File):
    kind = "device"

    def __init__(self, kernel: "FakeKernel", device: VfioDevice, group: "IommuGroup"):
        super().__init__(kernel)
        self.device = device
        self.group = group
        # index -> (argsz needed, the reply after argsz when that fits, the chain, the whole
        # reply when it does not): the device's regions are fixed while this fd is open.
        self.region_replies: dict[int, tuple[int, bytearray, bytearray, bytearray]] = {}
        # Chosen once here, so vfio-pci's GET_REGION_INFO, which tests ask most, takes no branch for the others.
        self.lockless = ECHOING if device.echoes_cap_offset else LOCKLESS

    def ioctl(self, request: int, arg) -> int:
        handler = self.lockless.get(request)
        if handler is not None:
            return handler(self, arg)
        dev = self.device
        if request == uapi.VFIO_DEVICE_GET_IRQ_INFO:
            buf = buf_arg(arg)
            layout = uapi.vfio_irq_info
            info = copy_from_user(layout, buf, layout.size)
            if info.argsz < layout.size:
                raise error(errno.EINVAL, "argsz below vfio_irq_info")
            flags, count = dev.irq_info(info.index)
            layout.pack_into(buf, 0, argsz=info.argsz, flags=flags, index=info.index, count=count)
            return 0
        if request == uapi.VFIO_DEVICE_SET_IRQS:
            buf = buf_arg(arg)
            copy_from_user(uapi.vfio_irq_set, buf, uapi.vfio_irq_set.size)
            return dev.set_irqs(buf)
        if request == uapi.VFIO_DEVICE_RESET:
            dev.reset()
            return 0
        return dev.ioctl(request, arg)

    def get_info(self, arg) -> int:
        buf = buf_arg(arg)
        dev = self.device
        layout = uapi.vfio_device_info
        minsz = layout.offsetof("num_irqs") + 4
        info = copy_from_user(layout, buf, minsz)
        if info.argsz < minsz:
            raise error(errno.EINVAL, "argsz below vfio_device_info's minimum")
        out = layout.pack(argsz=info.argsz, flags=dev.flags, num_regions=dev.num_regions,
                          num_irqs=dev.num_irqs, cap_offset=0)
        if dev.echoes_cap_offset:
            buf[:minsz] = out[:minsz]
        else:
            copy_to_user(buf, out, layout, info.argsz, minsz)
        return 0

    def get_region_info(self, arg) -> int:
        """vfio_pci_ioctl_get_region_info: the caller's argsz comes back when the capability chain
        fits after the struct (it is copied there), else the argsz it needs with cap_offset 0."""
        try:
            argsz, index = _ARGSZ_AND_INDEX.unpack_from(arg)
        except TypeError:
            raise error(errno.EFAULT, "the ioctl takes a pointer to a struct") from None
        except struct.error:
            raise error(errno.EFAULT, f"vfio_region_info buffer shorter than {REGION_INFO_SIZE} bytes") from None
        try:
            needed, fits, chain, short = self.region_replies[index]
        except KeyError:
            needed, fits, chain, short = self.region_replies[index] = self.region_reply(index)
        if argsz < needed:
            if argsz < REGION_INFO_SIZE:
                raise error(errno.EINVAL, "argsz below vfio_region_info")
            arg[:REGION_INFO_SIZE] = short
        else:
            arg[4:REGION_INFO_SIZE] = fits
            if chain:
                arg[REGION_INFO_SIZE:needed] = chain
        return 0

    def get_region_info_echoing(self, arg) -> int:
        """The same rules; a region with no capability leaves cap_offset as it came."""
        cap_offset = bytes(buf_arg(arg)[_CAP_OFFSET:_CAP_OFFSET + 4])
        self.get_region_info(arg)
        if not struct.unpack_from("=I", arg, _FLAGS)[0] & uapi.VFIO_REGION_INFO_FLAG_CAPS:
            arg[_CAP_OFFSET:_CAP_OFFSET + 4] = cap_offset
        return 0

    def region_reply(self, index: int) -> tuple[int, bytearray, bytearray, bytearray]:
        """Packed once per region: bytearrays, because a bytearray slice assignment from a
        bytearray is a third of the cost of one from bytes."""
        flags, size, caps = self.device.region_info(index)
        offset = index << self.device.offset_shift
        pack = uapi.vfio_region_info.struct.pack
        if not caps:
            return REGION_INFO_SIZE, bytearray(pack(0, flags, index, 0, size, offset)[4:]), bytearray(), bytearray()
        flags |= uapi.VFIO_REGION_INFO_FLAG_CAPS
        chain = info_cap_chain(caps, REGION_INFO_SIZE, "region", self.kernel.profile.info_cap_align)
        needed = REGION_INFO_SIZE + len(chain)
        return (needed, bytearray(pack(0, flags, index, REGION_INFO_SIZE, size, offset)[4:]), bytearray(chain),
                bytearray(pack(needed, flags, index, 0, size, offset)))

    def release(self) -> None:
        self.device.close_device()
        self.group.device_fds -= 1
        opened = self.group.opened
        if opened is not None and opened.released and not self.group.device_fds:
            opened.finish_release()


LOCKLESS = {uapi.VFIO_DEVICE_GET_REGION_INFO: DeviceFile.get_region_info, uapi.VFIO_DEVICE_GET_INFO: DeviceFile.get_info}
ECHOING = {**LOCKLESS, uapi.VFIO_DEVICE_GET_REGION_INFO: DeviceFile.get_region_info_echoing}
