"""vfio-pci in the fake kernel: what drivers/vfio/pci does on top of a PCI function.

Config space is virtualized with per-byte permissions (virtualized bits come from vconfig,
writable bits reach the device), BARs are trapped or memfd-backed, and the interrupt contexts
follow vfio_pci_intrs.c: INTx is automasked, MSI needs a free interrupt mode, and SET_IRQS
answers each misuse with the errno Linux gives.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from typing import TYPE_CHECKING

from vfio_impl import uapi

from .eventfd import EventfdCtx
from .mmio import MMIOMapping, split_access
from . import pci

if TYPE_CHECKING:
    from .kernel import FakeKernel

OFFSET_SHIFT = 40
OFFSET_MASK = (1 << OFFSET_SHIFT) - 1
NUM_REGIONS = uapi.VFIO_PCI_NUM_REGIONS
NUM_IRQS = uapi.VFIO_PCI_NUM_IRQS
INTX, MSI, MSIX, ERR, REQ = (uapi.VFIO_PCI_INTX_IRQ_INDEX, uapi.VFIO_PCI_MSI_IRQ_INDEX,
                             uapi.VFIO_PCI_MSIX_IRQ_INDEX, uapi.VFIO_PCI_ERR_IRQ_INDEX,
                             uapi.VFIO_PCI_REQ_IRQ_INDEX)
IRQ_NONE = -1
CONFIG = uapi.VFIO_PCI_CONFIG_REGION_INDEX
ROM = uapi.VFIO_PCI_ROM_REGION_INDEX
VGA = uapi.VFIO_PCI_VGA_REGION_INDEX
PAGE_SIZE = mmap.PAGESIZE
SET_IRQS_MINSZ = uapi.vfio_irq_set.offsetof("count") + 4
DATA_MASK = uapi.VFIO_IRQ_SET_DATA_TYPE_MASK
ACTION_MASK = uapi.VFIO_IRQ_SET_ACTION_TYPE_MASK

# Capability lengths vfio-pci knows; 0 hides the capability, None means computed.
CAP_LENGTHS = {pci.PCI_CAP_ID_PM: 8, pci.PCI_CAP_ID_MSI: None, pci.PCI_CAP_ID_EXP: None,
               pci.PCI_CAP_ID_MSIX: 12, 0x03: 8, 0x04: 4, 0x06: 4, 0x09: None, 0x0D: 8, 0x13: 6}


def _einval(what: str) -> OSError:
    return OSError(errno.EINVAL, what)


class IRQContext:
    """One vector's trigger eventfd, as vdev->ctx[i] holds it."""

    __slots__ = ("trigger",)

    def __init__(self) -> None:
        self.trigger: EventfdCtx | None = None

    def set_trigger(self, fd: int) -> None:
        new = EventfdCtx(fd) if fd >= 0 else None
        if self.trigger:
            self.trigger.put()
        self.trigger = new

    def signal(self) -> None:
        if self.trigger:
            self.trigger.signal()


class VfioPciDevice:
    """The vfio-pci driver bound to one function; opened state lives here between device fds."""

    def __init__(self, kernel: "FakeKernel", function: pci.PciFunction, bdf: str):
        self.kernel = kernel
        self.function = function
        self.bdf = bdf
        self.open_count = 0
        self.reset_works = getattr(function, "reset_works", False)
        self.vconfig = bytearray(len(function.config))
        self.virt = bytearray(len(function.config))
        self.writable = bytearray(len(function.config))
        self.ram: dict[int, int] = {}
        self.irq_type = IRQ_NONE
        self.intx = IRQContext()
        self.intx_unmask = None
        self.intx_masked = False
        self.virq_disabled = False
        self.msi_ctx: list[IRQContext] = []
        self.err_trigger: EventfdCtx | None = None
        self.req_trigger: EventfdCtx | None = None
        self.resets = 0
        function.sinks.intx = self._intx_line
        function.sinks.msi = self._msi_message
        function.sinks.dma_read = self._dma_read
        function.sinks.dma_write = self._dma_write

    # -- open / close -------------------------------------------------------------------------
    def open_device(self) -> None:
        """First open: enable the function, copy config into vconfig and set up permissions."""
        self.open_count += 1
        if self.open_count > 1:
            return
        f = self.function
        f.config_write(pci.PCI_COMMAND, 2, f.command() & ~pci.PCI_COMMAND_INTX_DISABLE)
        self._config_init()
        for index, bar in enumerate(f.bars):
            if bar and bar.ram and index not in self.ram:
                fd = os.memfd_create(f"vfio-{self.bdf}-bar{index}", os.MFD_CLOEXEC)
                os.ftruncate(fd, bar.size)
                self.ram[index] = fd

    def close_device(self) -> None:
        """Last close: tear interrupts down, stop DMA and reset, as vfio_pci_core_disable does."""
        self.open_count -= 1
        if self.open_count:
            return
        self._disable_irqs()
        if self.err_trigger:
            self.err_trigger.put()
            self.err_trigger = None
        if self.req_trigger:
            self.req_trigger.put()
            self.req_trigger = None
        f = self.function
        f.config_write(pci.PCI_COMMAND, 2, f.command() & ~pci.PCI_COMMAND_MASTER)
        if self.reset_works:
            f.reset()

    def release(self) -> None:
        for fd in self.ram.values():
            os.close(fd)
        self.ram.clear()

    # -- config space virtualization ----------------------------------------------------------
    def _perm(self, offset: int, size: int, virt: int, write: int) -> None:
        for i in range(size):
            self.virt[offset + i] = (virt >> (8 * i)) & 0xFF
            self.writable[offset + i] = (write >> (8 * i)) & 0xFF

    def _config_init(self) -> None:
        f = self.function
        n = len(f.config)
        self.vconfig[:] = f.config
        self.virt[:] = bytes(n)
        self.writable[:] = bytes(n)
        self._perm(pci.PCI_VENDOR_ID, 4, 0xFFFFFFFF, 0)
        self._perm(pci.PCI_COMMAND, 2, pci.PCI_COMMAND_INTX_DISABLE, 0xFFFF)
        self._perm(pci.PCI_STATUS, 2, pci.PCI_STATUS_CAP_LIST, 0)
        for off in (0x0C, 0x0D, 0x0F):
            self._perm(off, 1, 0, 0xFF)
        for off in range(pci.PCI_BASE_ADDRESS_0, pci.PCI_BASE_ADDRESS_0 + 24, 4):
            self._perm(off, 4, 0xFFFFFFFF, 0xFFFFFFFF)
        self._perm(pci.PCI_ROM_ADDRESS, 4, 0xFFFFFFFF, 0xFFFFFFFF)
        self._perm(pci.PCI_CAPABILITY_LIST, 1, 0xFF, 0)
        self._perm(pci.PCI_INTERRUPT_LINE, 1, 0xFF, 0xFF)
        self._perm(pci.PCI_INTERRUPT_PIN, 1, 0xFF, 0)
        for off in range(0x10, 0x40):
            if not self.virt[off] and not self.writable[off] and off not in (0x2C, 0x2D, 0x2E, 0x2F):
                self.virt[off] = 0xFF
        self._cap_init()

    def _cap_init(self) -> None:
        """Walk the capability list, hiding capabilities vfio-pci does not know."""
        f = self.function
        prev = pci.PCI_CAPABILITY_LIST
        pos = f.config[prev]
        seen = set()
        while pos and pos not in seen:
            seen.add(pos)
            cap_id, nxt = f.config[pos], f.config[pos + 1]
            length = self._cap_length(cap_id, pos)
            if not length:
                self.vconfig[prev] = nxt
                pos = nxt
                continue
            self._perm(pos, 2, 0xFFFF, 0)
            if cap_id == pci.PCI_CAP_ID_MSI:
                self._perm(pos + 2, length - 2, (1 << (8 * (length - 2))) - 1, (1 << (8 * (length - 2))) - 1)
                flags = struct.unpack_from("<H", self.vconfig, pos + 2)[0]
                struct.pack_into("<H", self.vconfig, pos + 2, flags & ~(pci.PCI_MSI_FLAGS_ENABLE | pci.PCI_MSI_FLAGS_QSIZE))
            elif cap_id == pci.PCI_CAP_ID_PM:
                self._perm(pos + 4, 2, 0, 0x8103)
            prev = pos + 1
            pos = nxt

    def _cap_length(self, cap_id: int, pos: int) -> int:
        if cap_id not in CAP_LENGTHS:
            return 0
        length = CAP_LENGTHS[cap_id]
        if length is not None:
            return length
        if cap_id == pci.PCI_CAP_ID_MSI:
            flags = self.function.config_read(pos + 2, 2)
            return 0xA + (4 if flags & pci.PCI_MSI_FLAGS_64BIT else 0) + (0xA if flags & pci.PCI_MSI_FLAGS_MASKBIT else 0)
        if cap_id == pci.PCI_CAP_ID_EXP:
            return 0x3C
        return self.function.config[pos + 2]

    def _bar_fixup(self, offset: int) -> int:
        """A BAR reads as the written address masked by its size, plus the type bits."""
        f = self.function
        raw = int.from_bytes(self.vconfig[offset:offset + 4], "little")
        if offset == pci.PCI_ROM_ADDRESS:
            if not f.rom:
                return 0
            return raw & ((~(len(f.rom) - 1) & 0xFFFFFFFF) | 1)
        index = (offset - pci.PCI_BASE_ADDRESS_0) // 4
        bar = f.bars[index]
        if bar is None:
            lower = f.bars[index - 1] if index else None
            if lower and lower.kind == pci.BAR_MEM64:
                return raw & ((~(lower.size - 1)) >> 32) & 0xFFFFFFFF
            return 0
        return (raw & ~(bar.size - 1) & 0xFFFFFFF0) | bar.flags

    def _config_dword(self, base: int) -> int:
        phys = int.from_bytes(self.function.config[base:base + 4], "little")
        virt = int.from_bytes(self.vconfig[base:base + 4], "little")
        mask = int.from_bytes(self.virt[base:base + 4], "little")
        if pci.PCI_BASE_ADDRESS_0 <= base <= pci.PCI_ROM_ADDRESS and (base < 0x28 or base == pci.PCI_ROM_ADDRESS):
            virt = self._bar_fixup(base)
        return (phys & ~mask) | (virt & mask)

    def config_read(self, offset: int, size: int) -> int:
        base = offset & ~3
        value = self._config_dword(base) if base + 4 <= len(self.vconfig) else 0
        return (value >> (8 * (offset - base))) & ((1 << (8 * size)) - 1)

    def config_write(self, offset: int, size: int, value: int) -> None:
        old_cmd = self.config_read(pci.PCI_COMMAND, 2)
        for i in range(size):
            pos = offset + i
            b = (value >> (8 * i)) & 0xFF
            w = self.writable[pos]
            v = self.virt[pos]
            if not w:
                continue
            self.vconfig[pos] = (self.vconfig[pos] & ~(w & v)) | (b & w & v)
            phys_bits = w & ~v & 0xFF
            if phys_bits:
                cur = self.function.config[pos]
                self.function.config_write(pos, 1, (cur & ~phys_bits) | (b & phys_bits))
        if offset < pci.PCI_COMMAND + 2 and offset + size > pci.PCI_COMMAND:
            self._command_written(old_cmd)
        msi = self.function.msi_cap()
        if msi and offset < msi.offset + 4 and offset + size > msi.offset + 2:
            self._msi_flags_written(msi.offset)

    def _command_written(self, old_cmd: int) -> None:
        new = self.config_read(pci.PCI_COMMAND, 2)
        for bit in (pci.PCI_COMMAND_MEMORY, pci.PCI_COMMAND_IO):
            virt = struct.unpack_from("<H", self.vconfig, pci.PCI_COMMAND)[0]
            virt = (virt | bit) if new & bit else (virt & ~bit)
            struct.pack_into("<H", self.vconfig, pci.PCI_COMMAND, virt)
        disable = bool(new & pci.PCI_COMMAND_INTX_DISABLE)
        if disable and not self.virq_disabled:
            self.virq_disabled = True
            self.intx_mask()
        elif not disable and self.virq_disabled:
            self.virq_disabled = False
            self.intx_unmask_handler()

    def _msi_flags_written(self, pos: int) -> None:
        """Queue size is capped at what the device can do; enable stays virtual."""
        hw = self.function.config_read(pos + 2, 2)
        flags = struct.unpack_from("<H", self.vconfig, pos + 2)[0]
        qmax = (hw & pci.PCI_MSI_FLAGS_QMASK) >> 1
        qsize = min((flags & pci.PCI_MSI_FLAGS_QSIZE) >> 4, qmax)
        flags = (flags & ~pci.PCI_MSI_FLAGS_QSIZE & (pci.PCI_MSI_FLAGS_ENABLE | pci.PCI_MSI_FLAGS_QSIZE)) | (qsize << 4)
        flags |= hw & ~(pci.PCI_MSI_FLAGS_ENABLE | pci.PCI_MSI_FLAGS_QSIZE)
        struct.pack_into("<H", self.vconfig, pos + 2, flags)

    def memory_enabled(self) -> bool:
        return bool(struct.unpack_from("<H", self.vconfig, pci.PCI_COMMAND)[0] & pci.PCI_COMMAND_MEMORY)

    # -- regions --------------------------------------------------------------------------------
    @property
    def num_regions(self) -> int:
        return NUM_REGIONS

    def region_info(self, index: int) -> tuple[int, int, list]:
        """(flags, size, caps) of a region, or EINVAL as vfio_pci_ioctl_get_region_info answers."""
        f = self.function
        if index == CONFIG:
            return uapi.VFIO_REGION_INFO_FLAG_READ | uapi.VFIO_REGION_INFO_FLAG_WRITE, len(f.config), []
        if index < ROM:
            bar = f.bars[index]
            if bar is None:
                return 0, 0, []
            flags = uapi.VFIO_REGION_INFO_FLAG_READ | uapi.VFIO_REGION_INFO_FLAG_WRITE
            if bar.kind != pci.BAR_IO and bar.size >= PAGE_SIZE:
                flags |= uapi.VFIO_REGION_INFO_FLAG_MMAP
            return flags, bar.size, []
        if index == ROM:
            if not f.rom:
                return 0, 0, []
            return uapi.VFIO_REGION_INFO_FLAG_READ, len(f.rom), []
        if index == VGA:
            raise _einval("not a VGA device")
        raise _einval("region index out of range")

    def rw(self, offset: int, data: bytes | None, count: int) -> bytes | int:
        """pread (data None) or pwrite at a region offset, as vfio_pci_rw dispatches it."""
        index = offset >> OFFSET_SHIFT
        pos = offset & OFFSET_MASK
        if index >= self.num_regions:
            raise _einval("region index out of range")
        if index == CONFIG:
            return self._config_rw(pos, data, count)
        if index == ROM and data is not None:
            raise _einval("the ROM is read-only")
        if index == VGA:
            raise _einval("not a VGA device")
        return self._bar_rw(index, pos, data, count)

    def _config_rw(self, pos: int, data: bytes | None, count: int):
        if pos + count > len(self.vconfig):
            raise OSError(errno.EFAULT, "config access beyond the config space")
        if data is None:
            out = bytearray()
            for off, size in split_access(pos, count, (4, 2, 1)):
                out += self.config_read(off, size).to_bytes(size, "little")
            return bytes(out)
        for off, size in split_access(pos, count, (4, 2, 1)):
            self.config_write(off, size, int.from_bytes(data[off - pos:off - pos + size], "little"))
        return count

    def _bar_rw(self, index: int, pos: int, data: bytes | None, count: int):
        f = self.function
        if index == ROM:
            if not f.rom or pos >= len(f.rom):
                raise _einval("beyond the ROM")
            return bytes(f.rom[pos:pos + count])
        bar = f.bars[index]
        if bar is None or pos >= bar.size:
            raise _einval("beyond the BAR")
        count = min(count, bar.size - pos)
        if bar.kind != pci.BAR_IO and not self.memory_enabled():
            raise OSError(errno.EIO, "memory decode disabled")
        if bar.ram:
            if data is None:
                return os.pread(self.ram[index], count, pos)
            return os.pwrite(self.ram[index], data[:count], pos)
        if data is None:
            out = bytearray()
            for off, size in split_access(pos, count, (4, 2, 1)):
                out += f.mmio_read(index, off, size).to_bytes(size, "little")
            return bytes(out)
        for off, size in split_access(pos, count, (4, 2, 1)):
            f.mmio_write(index, off, size, int.from_bytes(data[off - pos:off - pos + size], "little"))
        return count

    def mmap(self, offset: int, length: int, prot: int):
        index = offset >> OFFSET_SHIFT
        pos = offset & OFFSET_MASK
        if index >= self.num_regions or index >= ROM:
            raise _einval("region cannot be mmapped")
        flags, size, _ = self.region_info(index)
        if not flags & uapi.VFIO_REGION_INFO_FLAG_MMAP:
            raise _einval("region cannot be mmapped")
        phys_len = (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        if pos % PAGE_SIZE or length <= 0 or pos + length > phys_len:
            raise _einval("mmap outside the BAR")
        bar = self.function.bars[index]
        if bar.ram:
            return mmap.mmap(self.ram[index], length, mmap.MAP_SHARED, prot, offset=pos)
        return MMIOMapping(lambda off, n: self.kernel.locked(self.function.mmio_read, index, pos + off, n),
                           lambda off, n, v: self.kernel.locked(self.function.mmio_write, index, pos + off, n, v),
                           length, self.memory_enabled)

    # -- interrupts -----------------------------------------------------------------------------
    def irq_count(self, index: int) -> int:
        f = self.function
        if index == INTX:
            return 1 if self.vconfig[pci.PCI_INTERRUPT_PIN] else 0
        if index == MSI:
            cap = f.msi_cap()
            return 1 << ((f.config_read(cap.offset + 2, 2) & pci.PCI_MSI_FLAGS_QMASK) >> 1) if cap else 0
        if index == MSIX:
            return getattr(f, "msix_vectors", 0)
        if index == ERR:
            return 1 if f.pcie else 0
        if index == REQ:
            return 1
        return 0

    def irq_info(self, index: int) -> tuple[int, int]:
        if index >= NUM_IRQS or (index == ERR and not self.function.pcie):
            raise _einval("irq index out of range")
        flags = uapi.VFIO_IRQ_INFO_EVENTFD
        if index == INTX:
            flags |= uapi.VFIO_IRQ_INFO_MASKABLE | uapi.VFIO_IRQ_INFO_AUTOMASKED
        else:
            flags |= uapi.VFIO_IRQ_INFO_NORESIZE
        return flags, self.irq_count(index)

    def set_irqs(self, buf: bytearray) -> int:
        """VFIO_DEVICE_SET_IRQS: vfio_set_irqs_validate_and_prepare, then the per-index handler."""
        hdr = uapi.vfio_irq_set.unpack(buf)
        if (hdr.argsz < SET_IRQS_MINSZ or hdr.index >= NUM_IRQS or hdr.count >= 0xFFFFFFFF - hdr.start
                or hdr.flags & ~(DATA_MASK | ACTION_MASK)):
            raise _einval("bad vfio_irq_set header")
        max_count = self.irq_count(hdr.index)
        if hdr.start >= max_count or hdr.start + hdr.count > max_count:
            raise _einval("start/count beyond the index's vectors")
        data_type = hdr.flags & DATA_MASK
        size = {uapi.VFIO_IRQ_SET_DATA_NONE: 0, uapi.VFIO_IRQ_SET_DATA_BOOL: 1,
                uapi.VFIO_IRQ_SET_DATA_EVENTFD: 4}.get(data_type)
        if size is None:
            raise _einval("more than one data type")
        if size and hdr.argsz - SET_IRQS_MINSZ < hdr.count * size:
            raise _einval("argsz too small for the data")
        base = uapi.vfio_irq_set.size
        raw = bytes(buf[base:base + hdr.count * size])
        if len(raw) < hdr.count * size:
            raise OSError(errno.EFAULT, "data beyond the buffer")
        data = (list(struct.unpack(f"<{hdr.count}i", raw)) if size == 4 else list(raw)) if size else None
        action = hdr.flags & ACTION_MASK
        handler = self._irq_handler(hdr.index, action)
        if handler is None:
            raise OSError(errno.ENOTTY, "no handler for that index and action")
        return handler(hdr.index, hdr.start, hdr.count, data_type, data) or 0

    def _irq_handler(self, index: int, action: int):
        if index == INTX:
            return {uapi.VFIO_IRQ_SET_ACTION_MASK: self._set_intx_mask,
                    uapi.VFIO_IRQ_SET_ACTION_UNMASK: self._set_intx_unmask,
                    uapi.VFIO_IRQ_SET_ACTION_TRIGGER: self._set_intx_trigger}.get(action)
        if index in (MSI, MSIX):
            return self._set_msi_trigger if action == uapi.VFIO_IRQ_SET_ACTION_TRIGGER else None
        if index in (ERR, REQ) and action == uapi.VFIO_IRQ_SET_ACTION_TRIGGER:
            if index == ERR and not self.function.pcie:
                return None
            return self._set_err_req_trigger
        return None

    # INTx ---------------------------------------------------------------------------------------
    def _intx_line(self, level: bool) -> None:
        """The device's pin changed: the hard IRQ handler masks and signals, as vfio_intx_handler."""
        if level and self.irq_type == INTX and not self.intx_masked and not self.virq_disabled:
            self._mask_hw()
            self.intx.signal()

    def _mask_hw(self) -> None:
        self.intx_masked = True
        f = self.function
        f.config_write(pci.PCI_COMMAND, 2, f.command() | pci.PCI_COMMAND_INTX_DISABLE)

    def intx_mask(self) -> None:
        if self.irq_type == INTX and not self.intx_masked:
            self._mask_hw()

    def intx_unmask_handler(self) -> None:
        """Unmask; a line still asserted stays masked and is sent to the user again."""
        if self.irq_type != INTX or self.virq_disabled or not self.intx_masked:
            return
        f = self.function
        if f.intx_level:
            self.intx.signal()
            return
        self.intx_masked = False
        f.config_write(pci.PCI_COMMAND, 2, f.command() & ~pci.PCI_COMMAND_INTX_DISABLE)

    def _send_intx(self) -> None:
        if self.irq_type == INTX and not self.virq_disabled:
            self.intx.signal()

    def _set_intx_mask(self, index, start, count, data_type, data):
        if self.irq_type != INTX or start != 0 or count != 1:
            raise _einval("INTx is not enabled")
        if data_type == uapi.VFIO_IRQ_SET_DATA_EVENTFD:
            raise OSError(errno.ENOTTY, "masking by eventfd is not implemented")
        if data_type == uapi.VFIO_IRQ_SET_DATA_NONE or data[0]:
            self.intx_mask()

    def _set_intx_unmask(self, index, start, count, data_type, data):
        if self.irq_type != INTX:
            raise _einval("INTx is not enabled")
        if data_type == uapi.VFIO_IRQ_SET_DATA_EVENTFD:
            self._set_unmask_eventfd(data[0] if count else -1)
        elif data_type == uapi.VFIO_IRQ_SET_DATA_NONE or (count and data[0]):
            self.intx_unmask_handler()

    def _set_unmask_eventfd(self, fd: int) -> None:
        old = self.intx_unmask
        self.intx_unmask = None
        if old:
            self.kernel.virqfd_remove(old)
            old.put()
        if fd >= 0:
            ctx = EventfdCtx(fd)
            self.intx_unmask = ctx
            self.kernel.virqfd_add(ctx, self.intx_unmask_handler)

    def _set_intx_trigger(self, index, start, count, data_type, data):
        if self.irq_type == INTX and not count and data_type == uapi.VFIO_IRQ_SET_DATA_NONE:
            self._intx_disable()
            return
        if self.irq_type not in (INTX, IRQ_NONE) or start != 0 or count != 1:
            raise _einval("INTx trigger needs start 0, count 1 and no other mode")
        if data_type == uapi.VFIO_IRQ_SET_DATA_EVENTFD:
            self.intx.set_trigger(data[0])
            if self.irq_type != INTX:
                self._intx_enable()
            return
        if self.irq_type != INTX:
            raise _einval("INTx is not enabled")
        if data_type == uapi.VFIO_IRQ_SET_DATA_NONE or data[0]:
            self._send_intx()

    def _intx_enable(self) -> None:
        self.irq_type = INTX
        self.intx_masked = self.virq_disabled
        f = self.function
        cmd = f.command()
        f.config_write(pci.PCI_COMMAND, 2, (cmd | pci.PCI_COMMAND_INTX_DISABLE) if self.intx_masked
                       else (cmd & ~pci.PCI_COMMAND_INTX_DISABLE))
        if f.intx_level:
            self._intx_line(True)

    def _intx_disable(self) -> None:
        self._set_unmask_eventfd(-1)
        self.intx.set_trigger(-1)
        self.intx_masked = False
        self.irq_type = IRQ_NONE

    # MSI / MSI-X --------------------------------------------------------------------------------
    def _msi_message(self, vector: int) -> None:
        if self.irq_type == MSI and vector < len(self.msi_ctx):
            self.msi_ctx[vector].signal()

    def _set_msi_trigger(self, index, start, count, data_type, data):
        if self.irq_type == index and not count and data_type == uapi.VFIO_IRQ_SET_DATA_NONE:
            self._msi_disable()
            return
        if self.irq_type not in (index, IRQ_NONE):
            raise _einval("another interrupt mode is enabled")
        if data_type == uapi.VFIO_IRQ_SET_DATA_EVENTFD:
            if self.irq_type == index:
                return self._msi_set_block(start, count, data)
            self._msi_enable(index, start + count)
            try:
                self._msi_set_block(start, count, data)
            except OSError:
                self._msi_disable()
                raise
            return
        if self.irq_type != index or start + count > len(self.msi_ctx):
            raise _einval("vectors not enabled")
        for i in range(start, start + count):
            if data_type == uapi.VFIO_IRQ_SET_DATA_NONE or data[i - start]:
                self.msi_ctx[i].signal()

    def _msi_enable(self, index: int, nvec: int) -> None:
        self.msi_ctx = [IRQContext() for _ in range(nvec)]
        self.irq_type = index
        cap = self.function.msi_cap()
        if index == MSI and cap:
            qsize = max(nvec - 1, 0).bit_length()
            flags = self.function.config_read(cap.offset + 2, 2) & ~pci.PCI_MSI_FLAGS_QSIZE
            self.function.config_write(cap.offset + 2, 2, flags | pci.PCI_MSI_FLAGS_ENABLE | (qsize << 4))
        else:
            self.function.msix_enable(True)

    def _msi_set_block(self, start: int, count: int, fds: list[int]) -> None:
        if start >= len(self.msi_ctx) or start + count > len(self.msi_ctx):
            raise _einval("vectors beyond those enabled")
        for j in range(count):
            try:
                self.msi_ctx[start + j].set_trigger(fds[j])
            except OSError:
                for k in range(start, start + j):
                    self.msi_ctx[k].set_trigger(-1)
                raise

    def _msi_disable(self) -> None:
        for ctx in self.msi_ctx:
            ctx.set_trigger(-1)
        cap = self.function.msi_cap()
        if self.irq_type == MSI and cap:
            flags = self.function.config_read(cap.offset + 2, 2)
            self.function.config_write(cap.offset + 2, 2, flags & ~(pci.PCI_MSI_FLAGS_ENABLE | pci.PCI_MSI_FLAGS_QSIZE))
        elif self.irq_type == MSIX:
            self.function.msix_enable(False)
        self.msi_ctx = []
        self.irq_type = IRQ_NONE

    def _disable_irqs(self) -> None:
        if self.irq_type == INTX:
            self._intx_disable()
        elif self.irq_type in (MSI, MSIX):
            self._msi_disable()

    # ERR / REQ ----------------------------------------------------------------------------------
    def _set_err_req_trigger(self, index, start, count, data_type, data):
        attr = "err_trigger" if index == ERR else "req_trigger"
        if start != 0 or count > 1:
            raise _einval("ERR/REQ take start 0 and at most one vector")
        ctx = getattr(self, attr)
        if data_type == uapi.VFIO_IRQ_SET_DATA_NONE:
            if ctx:
                if count:
                    ctx.signal()
                else:
                    ctx.put()
                    setattr(self, attr, None)
                return
            raise _einval("no eventfd set")
        if not count:
            raise _einval("count 0 with data")
        if data_type == uapi.VFIO_IRQ_SET_DATA_BOOL:
            if data[0] and ctx:
                ctx.signal()
            return
        fd = data[0]
        if fd == -1:
            if ctx:
                ctx.put()
            setattr(self, attr, None)
        elif fd >= 0:
            new = EventfdCtx(fd)
            if ctx:
                ctx.put()
            setattr(self, attr, new)

    # DMA ----------------------------------------------------------------------------------------
    def _iommu(self):
        group = self.kernel.group_of(self.bdf)
        container = group.container if group else None
        return container.iommu if container is not None else None

    def _dma_read(self, addr: int, size: int):
        iommu = self._iommu()
        return iommu.dma_read(addr, size) if iommu is not None else None

    def _dma_write(self, addr: int, data: bytes) -> bool:
        iommu = self._iommu()
        return iommu.dma_write(addr, data) if iommu is not None else False

    # reset ----------------------------------------------------------------------------------------
    def reset(self) -> None:
        """pci_try_reset_function: the function resets, then its saved header and MSI state return."""
        if not self.reset_works:
            raise _einval("device has no reset method")
        f = self.function
        saved = bytes(f.config)
        f.reset()
        status = f.config[pci.PCI_STATUS:pci.PCI_STATUS + 2]
        f.config[:0x40] = saved[:0x40]
        f.config[pci.PCI_STATUS:pci.PCI_STATUS + 2] = status
        cap = f.msi_cap()
        if cap:
            f.config[cap.offset:cap.offset + cap.size] = saved[cap.offset:cap.offset + cap.size]
        self.resets += 1
