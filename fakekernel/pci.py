"""Emulated PCI hardware: what sits behind vfio-pci in the fake kernel.

This is the device side only (raw config space with write masks, BARs, the INTx line, MSI
delivery, DMA through the IOMMU). What vfio-pci does on top of it lives in vfio_pci.py.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable

PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_ROM_ADDRESS = 0x30
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D

PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_COMMAND_SERR = 0x100
PCI_COMMAND_INTX_DISABLE = 0x400
PCI_STATUS_INTERRUPT = 0x8
PCI_STATUS_CAP_LIST = 0x10

PCI_CAP_ID_PM = 0x01
PCI_CAP_ID_MSI = 0x05
PCI_CAP_ID_EXP = 0x10
PCI_CAP_ID_MSIX = 0x11
PCI_MSI_FLAGS = 2
PCI_MSI_FLAGS_ENABLE = 0x1
PCI_MSI_FLAGS_QMASK = 0xE
PCI_MSI_FLAGS_QSIZE = 0x70
PCI_MSI_FLAGS_64BIT = 0x80
PCI_MSI_FLAGS_MASKBIT = 0x100
PCI_MSIX_FLAGS = 2
PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_FLAGS_MASKALL = 0x4000

BAR_MEM32 = 0x0
BAR_MEM64 = 0x4
BAR_IO = 0x1
BAR_PREFETCH = 0x8

PCI_CFG_SPACE_SIZE = 256
PCI_CFG_SPACE_EXP_SIZE = 4096


@dataclass(slots=True)
class Bar:
    """One BAR of the hardware; `mmio` is the register file, or None for RAM-like BARs."""

    size: int
    kind: int = BAR_MEM32
    prefetch: bool = False
    ram: bool = False

    @property
    def flags(self) -> int:
        return self.kind | (BAR_PREFETCH if self.prefetch else 0)


@dataclass(slots=True)
class Sinks:
    """Where the device's outputs go; vfio-pci in the fake kernel plugs itself in here."""

    intx: Callable[[bool], None] = lambda level: None
    msi: Callable[[int], None] = lambda vector: None
    dma_read: Callable[[int, int], bytes | None] = lambda addr, n: None
    dma_write: Callable[[int, bytes], bool] = lambda addr, data: False


@dataclass(slots=True)
class Capability:
    cap_id: int
    offset: int
    size: int


class PciFunction:
    """A PCI function's hardware: config registers with write masks, BARs, interrupts, DMA."""

    vendor_id = 0
    device_id = 0
    revision = 0
    class_code = 0
    subsystem_vendor_id = 0x1AF4
    subsystem_id = 0x1100
    interrupt_pin = 0
    pcie = False
    model = "pci"

    def __init__(self) -> None:
        size = PCI_CFG_SPACE_EXP_SIZE if self.pcie else PCI_CFG_SPACE_SIZE
        self.config = bytearray(size)
        self.wmask = bytearray(size)
        self.bars: list[Bar | None] = [None] * 6
        self.rom: bytes | None = None
        self.caps: list[Capability] = []
        self.sinks = Sinks()
        self.intx_level = False
        self._build_header()

    def _build_header(self) -> None:
        c = self.config
        struct.pack_into("<HH", c, 0, self.vendor_id, self.device_id)
        c[PCI_REVISION_ID] = self.revision
        c[PCI_CLASS_PROG:PCI_CLASS_PROG + 3] = self.class_code.to_bytes(3, "little")
        struct.pack_into("<HH", c, PCI_SUBSYSTEM_VENDOR_ID, self.subsystem_vendor_id, self.subsystem_id)
        c[PCI_INTERRUPT_PIN] = self.interrupt_pin
        struct.pack_into("<H", self.wmask, PCI_COMMAND,
                         PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE | 0x140)
        self.wmask[0x0C] = 0xFF
        self.wmask[0x0D] = 0xFF
        self.wmask[PCI_INTERRUPT_LINE] = 0xFF

    def add_bar(self, index: int, bar: Bar) -> None:
        self.bars[index] = bar
        off = PCI_BASE_ADDRESS_0 + 4 * index
        mask = ~(bar.size - 1)
        struct.pack_into("<I", self.config, off, bar.flags)
        struct.pack_into("<I", self.wmask, off, mask & 0xFFFFFFF0)
        if bar.kind == BAR_MEM64:
            struct.pack_into("<I", self.wmask, off + 4, (mask >> 32) & 0xFFFFFFFF)

    def set_rom(self, image: bytes, size: int) -> None:
        self.rom = image.ljust(size, b"\xff")
        struct.pack_into("<I", self.wmask, PCI_ROM_ADDRESS, (~(size - 1) & 0xFFFFF800) | 1)

    def add_capability(self, cap_id: int, offset: int, size: int) -> None:
        """Chains the new capability at the end of the list, as QEMU's pci_add_capability does."""
        c = self.config
        if self.caps:
            c[self.caps[-1].offset + 1] = offset
        else:
            c[PCI_CAPABILITY_LIST] = offset
            struct.pack_into("<H", c, PCI_STATUS, struct.unpack_from("<H", c, PCI_STATUS)[0] | PCI_STATUS_CAP_LIST)
        c[offset] = cap_id
        c[offset + 1] = 0
        self.caps.append(Capability(cap_id, offset, size))

    def add_msi(self, offset: int, vectors_log2: int, is_64bit: bool, maskbit: bool) -> None:
        size = 0xA + (4 if is_64bit else 0) + (0xA if maskbit else 0)
        self.add_capability(PCI_CAP_ID_MSI, offset, size)
        flags = vectors_log2 << 1
        flags |= PCI_MSI_FLAGS_64BIT if is_64bit else 0
        flags |= PCI_MSI_FLAGS_MASKBIT if maskbit else 0
        struct.pack_into("<H", self.config, offset + PCI_MSI_FLAGS, flags)
        struct.pack_into("<H", self.wmask, offset + PCI_MSI_FLAGS, PCI_MSI_FLAGS_ENABLE | PCI_MSI_FLAGS_QSIZE)
        self.wmask[offset + 4:offset + size] = b"\xff" * (size - 4)

    def msi_cap(self) -> Capability | None:
        return next((c for c in self.caps if c.cap_id == PCI_CAP_ID_MSI), None)

    def msi_enabled(self) -> bool:
        cap = self.msi_cap()
        return bool(cap) and bool(self.config_read(cap.offset + PCI_MSI_FLAGS, 2) & PCI_MSI_FLAGS_ENABLE)

    def msix_enable(self, on: bool) -> None:
        cap = next((c for c in self.caps if c.cap_id == PCI_CAP_ID_MSIX), None)
        if cap:
            flags = self.config_read(cap.offset + PCI_MSIX_FLAGS, 2)
            flags = (flags | PCI_MSIX_FLAGS_ENABLE) if on else (flags & ~PCI_MSIX_FLAGS_ENABLE)
            struct.pack_into("<H", self.config, cap.offset + PCI_MSIX_FLAGS, flags)

    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            m = self.wmask[offset + i]
            b = (value >> (8 * i)) & 0xFF
            self.config[offset + i] = (self.config[offset + i] & ~m) | (b & m)

    def command(self) -> int:
        return self.config_read(PCI_COMMAND, 2)

    def bus_master(self) -> bool:
        return bool(self.command() & PCI_COMMAND_MASTER)

    def set_irq(self, level: bool) -> None:
        """Drive the INTx pin; the status bit follows it as in PCI 2.3."""
        self.intx_level = level
        status = self.config_read(PCI_STATUS, 2)
        status = (status | PCI_STATUS_INTERRUPT) if level else (status & ~PCI_STATUS_INTERRUPT)
        struct.pack_into("<H", self.config, PCI_STATUS, status)
        self.sinks.intx(level)

    def msi_notify(self, vector: int) -> None:
        """An MSI is a DMA write: without bus master it never leaves the device."""
        if self.bus_master():
            self.sinks.msi(vector)

    def dma_read(self, addr: int, size: int) -> bytes | None:
        """No bus master, no DMA: the request never leaves the device."""
        return self.sinks.dma_read(addr, size) if self.bus_master() else None

    def dma_write(self, addr: int, data: bytes) -> bool:
        return self.sinks.dma_write(addr, data) if self.bus_master() else False

    def mmio_read(self, bar: int, offset: int, size: int) -> int:
        return 0xFFFFFFFFFFFFFFFF >> (64 - 8 * size)

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        pass

    def reset(self) -> None:
        """Function level reset: registers back to power-on values, the line de-asserted."""
        cmd = self.command() & ~(PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE)
        struct.pack_into("<H", self.config, PCI_COMMAND, cmd)
        cap = self.msi_cap()
        if cap:
            flags = self.config_read(cap.offset + PCI_MSI_FLAGS, 2) & ~(PCI_MSI_FLAGS_ENABLE | PCI_MSI_FLAGS_QSIZE)
            struct.pack_into("<H", self.config, cap.offset + PCI_MSI_FLAGS, flags)
        if self.intx_level:
            self.set_irq(False)
