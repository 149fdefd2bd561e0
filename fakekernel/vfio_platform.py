"""vfio-platform and vfio-amba in the fake kernel: what drivers/vfio/platform does on top of a
platform or AMBA device.

Each resource becomes a region at index << 40, each interrupt line an IRQ index with one
vector. A level-triggered line is maskable and automasked: its handler masks the line before
signalling, and only an unmask (ioctl or virqfd) lets it fire again. An edge line just signals.
The hardware IRQ is enabled only while a trigger eventfd is set and the line is not masked,
which is the disable depth Linux keeps for it. Most devices have no reset function (vfio-platform
loaded with reset_required=0 binds them anyway): no RESET flag, and VFIO_DEVICE_RESET is EINVAL.
"""

from __future__ import annotations

import errno
import mmap
import os
from typing import TYPE_CHECKING

from vfio_impl import uapi

from .devices.platform_test import PlatformDevice
from .err import error
from .eventfd import EventfdCtx
from .irq import ACTION_MASK, IRQContext, validate_and_prepare, wants
from .mmio import MMIOMapping, split_access
from .vfio_main import VFIO_PCI_OFFSET_MASK, VFIO_PCI_OFFSET_SHIFT, VfioDevice
from .virqfd import virqfd_disable, virqfd_enable

if TYPE_CHECKING:
    from .kernel import FakeKernel
    from .topology import PlatformDeviceSpec

PAGE_SIZE = mmap.PAGESIZE
LEVEL_FLAGS = uapi.VFIO_IRQ_INFO_MASKABLE | uapi.VFIO_IRQ_INFO_AUTOMASKED


def irq_flags(level: bool) -> int:
    """vfio_platform_irq_init: a level-triggered line is maskable and automasked."""
    return uapi.VFIO_IRQ_INFO_EVENTFD | (LEVEL_FLAGS if level else 0)


class PlatformIRQ(IRQContext):
    """vdev->irqs[i]: the trigger, the user's mask, and the mask/unmask virqfds."""

    __slots__ = ("level", "masked", "mask_fd", "unmask_fd")

    def __init__(self, level: bool) -> None:
        super().__init__()
        self.level = level
        self.masked = False
        self.mask_fd: EventfdCtx | None = None
        self.unmask_fd: EventfdCtx | None = None

    @property
    def flags(self) -> int:
        return irq_flags(self.level)

    @property
    def enabled(self) -> bool:
        return self.trigger is not None and not self.masked


class VfioPlatformDevice(VfioDevice):
    """The vfio-platform driver bound to one device; IRQ state lives from first open to last close."""

    driver = "vfio-platform"
    echoes_cap_offset = True

    def __init__(self, kernel: "FakeKernel", model: PlatformDevice, spec: "PlatformDeviceSpec"):
        super().__init__(kernel, spec, spec.name)
        self.model = model
        self.irqs: list[PlatformIRQ] = []
        self.ram: dict[int, int] = {}
        self.set_irqs_log: list[tuple[int, int, int, int]] = []
        model.irq_sink = self._line_changed
        model.call_later = kernel.call_later

    # -- what tests look at ---------------------------------------------------------------------
    def irq_masked(self, index: int) -> bool:
        return bool(self.irqs) and self.irqs[index].masked

    def line(self, index: int) -> bool:
        return self.model.line(index)

    @property
    def flags(self) -> int:
        return self.model.device_flags | (uapi.VFIO_DEVICE_FLAGS_RESET if self.model.reset else 0)

    @property
    def num_regions(self) -> int:
        return len(self.model.resources)

    @property
    def num_irqs(self) -> int:
        return len(self.model.irq_levels)

    # -- open / close ---------------------------------------------------------------------------
    def open_device(self) -> None:
        """vfio_platform_open_device: regions and IRQs set up afresh, then a reset if it has one."""
        self.open_count += 1
        if self.open_count > 1:
            return
        self.irqs = [PlatformIRQ(level) for level in self.model.irq_levels]
        for index, res in enumerate(self.model.resources):
            if res.ram and index not in self.ram:
                fd = os.memfd_create(f"vfio-platform-{self.name}-{index}", os.MFD_CLOEXEC)
                os.ftruncate(fd, res.size)
                self.ram[index] = fd
        if self.model.reset:
            self.reset()

    def close_device(self) -> None:
        """vfio_platform_close_device: a reset if it has one, then every IRQ freed with its eventfds."""
        self.open_count -= 1
        if self.open_count:
            return
        if self.model.reset:
            self.reset()
        for irq in self.irqs:
            virqfd_disable(self.kernel, irq.mask_fd)
            virqfd_disable(self.kernel, irq.unmask_fd)
            irq.mask_fd = irq.unmask_fd = None
            irq.set_trigger(-1)
        self.irqs = []

    def release(self) -> None:
        for fd in self.ram.values():
            os.close(fd)
        self.ram.clear()

    def reset(self) -> None:
        """vfio_platform_call_reset: the device's reset function; what it clears is the model's
        business."""
        if not self.model.reset:
            raise error(errno.EINVAL, f"no reset function found for {self.name}")
        self.model.reset()
        self.resets += 1

    # -- regions --------------------------------------------------------------------------------
    def region_info(self, index: int) -> tuple[int, int, tuple]:
        """No capabilities: vfio-platform has none to report."""
        if index >= self.num_regions:
            raise error(errno.EINVAL, "region index out of range")
        res = self.model.resources[index]
        flags = uapi.VFIO_REGION_INFO_FLAG_READ
        if not res.readonly:
            flags |= uapi.VFIO_REGION_INFO_FLAG_WRITE
        if not res.size % PAGE_SIZE:
            flags |= uapi.VFIO_REGION_INFO_FLAG_MMAP
        return flags, res.size, ()

    def rw(self, offset: int, data: bytes | None, count: int):
        """vfio_platform_read/write: past the end is EINVAL, a tail is cut short."""
        index, pos = offset >> VFIO_PCI_OFFSET_SHIFT, offset & VFIO_PCI_OFFSET_MASK
        if index >= self.num_regions:
            raise error(errno.EINVAL, "region index out of range")
        flags, size, _ = self.region_info(index)
        if not flags & (uapi.VFIO_REGION_INFO_FLAG_READ if data is None else uapi.VFIO_REGION_INFO_FLAG_WRITE):
            raise error(errno.EINVAL, "region does not allow that access")
        if pos >= size:
            raise error(errno.EINVAL, "beyond the region")
        count = min(count, size - pos)
        if index in self.ram:
            if data is None:
                return os.pread(self.ram[index], count, pos)
            return os.pwrite(self.ram[index], data[:count], pos)
        out = bytearray()
        for off, n in split_access(pos, count, (4, 2, 1)):
            if data is None:
                out += self.model.mmio_read(index, off, n).to_bytes(n, "little")
            else:
                self.model.mmio_write(index, off, n, int.from_bytes(data[off - pos:off - pos + n], "little"))
        return bytes(out) if data is None else count

    def mmap(self, offset: int, length: int, prot: int):
        index, pos = offset >> VFIO_PCI_OFFSET_SHIFT, offset & VFIO_PCI_OFFSET_MASK
        if index >= self.num_regions:
            raise error(errno.EINVAL, "region index out of range")
        flags, size, _ = self.region_info(index)
        if not flags & uapi.VFIO_REGION_INFO_FLAG_MMAP:
            raise error(errno.EINVAL, "region cannot be mmapped")
        if prot & mmap.PROT_WRITE and not flags & uapi.VFIO_REGION_INFO_FLAG_WRITE:
            raise error(errno.EINVAL, "writable mapping of a read-only region")
        if size < PAGE_SIZE or length <= 0 or pos + length > size:
            raise error(errno.EINVAL, "mmap outside the region")
        if index in self.ram:
            return mmap.mmap(self.ram[index], length, mmap.MAP_SHARED, prot, offset=pos)
        return MMIOMapping(lambda off, n: self.kernel.locked(self.model.mmio_read, index, pos + off, n),
                           lambda off, n, v: self.kernel.locked(self.model.mmio_write, index, pos + off, n, v),
                           length, lambda: True)

    # -- interrupts -----------------------------------------------------------------------------
    def irq_info(self, index: int) -> tuple[int, int]:
        if index >= self.num_irqs:
            raise error(errno.EINVAL, "irq index out of range")
        return irq_flags(self.model.irq_levels[index]), 1

    def _line_changed(self, index: int, asserted: bool) -> None:
        """The interrupt controller: a raised line reaches the handler while the IRQ is enabled."""
        if asserted and self.irqs and self.irqs[index].enabled:
            self._handler(index)

    def _handler(self, index: int) -> None:
        """vfio_automasked_irq_handler for level lines, vfio_irq_handler for edge lines."""
        irq = self.irqs[index]
        if irq.level:
            if irq.masked:
                return
            irq.masked = True
        irq.signal()

    def _enabled(self, index: int) -> None:
        """enable_irq: a level line still asserted is delivered again."""
        irq = self.irqs[index]
        if irq.level and irq.enabled and self.model.line(index):
            self._handler(index)

    def mask(self, index: int) -> None:
        self.irqs[index].masked = True

    def unmask(self, index: int) -> None:
        irq = self.irqs[index]
        if irq.masked:
            irq.masked = False
            self._enabled(index)

    def set_irqs(self, buf: bytearray) -> int:
        """VFIO_DEVICE_SET_IRQS: the common validation with num_irqs as both limits, then the action."""
        hdr = uapi.vfio_irq_set.unpack(buf)
        self.set_irqs_log.append((hdr.index, hdr.flags, hdr.start, hdr.count))
        data_type, data = validate_and_prepare(hdr, buf, self.num_irqs, self.num_irqs)
        handler = {uapi.VFIO_IRQ_SET_ACTION_MASK: self._set_mask,
                   uapi.VFIO_IRQ_SET_ACTION_UNMASK: self._set_unmask,
                   uapi.VFIO_IRQ_SET_ACTION_TRIGGER: self._set_trigger}.get(hdr.flags & ACTION_MASK)
        if handler is None:
            raise error(errno.ENOTTY, "no single action in the flags")
        handler(hdr.index, hdr.start, hdr.count, data_type, data)
        return 0

    def _set_mask(self, index, start, count, data_type, data) -> None:
        self._set_mask_or_unmask(index, start, count, data_type, data, "mask_fd", self.mask)

    def _set_unmask(self, index, start, count, data_type, data) -> None:
        self._set_mask_or_unmask(index, start, count, data_type, data, "unmask_fd", self.unmask)

    def _set_mask_or_unmask(self, index, start, count, data_type, data, attr, action) -> None:
        if start != 0 or count != 1:
            raise error(errno.EINVAL, "mask/unmask take start 0 and count 1")
        irq = self.irqs[index]
        if not irq.flags & uapi.VFIO_IRQ_INFO_MASKABLE:
            raise error(errno.EINVAL, "an edge IRQ is not maskable")
        if data_type == uapi.VFIO_IRQ_SET_DATA_EVENTFD:
            if data[0] >= 0:
                setattr(irq, attr, virqfd_enable(self.kernel, getattr(irq, attr), data[0], lambda: action(index)))
            else:
                virqfd_disable(self.kernel, getattr(irq, attr))
                setattr(irq, attr, None)
        elif wants(data_type, data):
            action(index)

    def _set_trigger(self, index, start, count, data_type, data) -> None:
        irq = self.irqs[index]
        if not count and data_type == uapi.VFIO_IRQ_SET_DATA_NONE:
            irq.set_trigger(-1)
            return
        if start != 0 or count != 1:
            raise error(errno.EINVAL, "trigger takes start 0 and count 1")
        if data_type == uapi.VFIO_IRQ_SET_DATA_EVENTFD:
            irq.set_trigger(-1)
            if data[0] >= 0:
                irq.set_trigger(data[0])
                self._enabled(index)
        elif wants(data_type, data):
            self._handler(index)


class VfioAmbaDevice(VfioPlatformDevice):
    """vfio-amba: the vfio-platform core on an AMBA device, which it never requires a reset of."""

    driver = "vfio-amba"


# The VFIO driver of each bus a devicetree device sits on.
BUS_DRIVERS = {"platform": VfioPlatformDevice, "amba": VfioAmbaDevice}
