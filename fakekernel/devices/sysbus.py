"""QEMU sysbus devices with one MMIO region, as QEMU's memory core hands them accesses, and the
ID block every ARM PrimeCell ends its page with.

Their MemoryRegionOps set no access sizes, so every access of 1 to 4 bytes reaches the device
at its own offset, and a read answers the register cut to the access size; an 8-byte access
(a mapping read as a u64) arrives as two 4-byte ones, low word first.
"""

from __future__ import annotations

from vfio_impl import uapi

from .platform_test import PlatformDevice, Resource

MAX_ACCESS = 4
PRIMECELL_SIZE = 0x1000
# The peripheral ID (4 bytes) then the PrimeCell ID (4 bytes), one byte in the low bits of each
# word, in the last 32 bytes of the page (amba_read_periphid reads them there).
PRIMECELL_ID = PRIMECELL_SIZE - 0x20
AMBA_CID = 0xB105F00D


class SysBusDevice(PlatformDevice):
    """A device model answers `read(offset)` and `write(offset, value)` and raises its lines with
    `set_irq`; the interrupt controller sees a line only when its level changes, as the GIC
    ignores a level it already has."""

    def __init__(self) -> None:
        super().__init__()
        self.levels = [False] * len(self.irq_levels)

    def mmio_read(self, region: int, offset: int, size: int) -> int:
        if size > MAX_ACCESS:
            return self.mmio_read(region, offset, MAX_ACCESS) | self.mmio_read(region, offset + MAX_ACCESS,
                                                                               MAX_ACCESS) << 32
        return self.read(offset) & ((1 << 8 * size) - 1)

    def mmio_write(self, region: int, offset: int, size: int, value: int) -> None:
        if size > MAX_ACCESS:
            self.write(offset, value & 0xFFFFFFFF)
            self.write(offset + MAX_ACCESS, value >> 32)
            return
        self.write(offset, value)

    def read(self, offset: int) -> int:
        return 0

    def write(self, offset: int, value: int) -> None:
        pass

    def line(self, index: int) -> bool:
        return self.levels[index]

    def set_irq(self, index: int, level: bool) -> None:
        if self.levels[index] != level:
            self.levels[index] = level
            self.irq_sink(index, level)


class PrimeCell(SysBusDevice):
    """An ARM PrimeCell: one 4 KiB page of registers ending in its ID block, one level-triggered
    interrupt, and the AMBA flag vfio-amba reports. `periphid` is what the AMBA bus reads at
    probe and shows in sysfs as `id`."""

    resources = (Resource(PRIMECELL_SIZE),)
    irq_levels = (True,)
    device_flags = uapi.VFIO_DEVICE_FLAGS_AMBA
    periphid = 0

    def read(self, offset: int) -> int:
        if offset >= PRIMECELL_ID:
            return (self.periphid | AMBA_CID << 32) >> 8 * ((offset - PRIMECELL_ID) >> 2) & 0xFF
        return self.register(offset)

    def register(self, offset: int) -> int:
        """The device's own registers below the ID block."""
        return 0
