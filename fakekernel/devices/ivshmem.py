"""QEMU's ivshmem-plain (hw/misc/ivshmem.c): shared memory in BAR2 and four registers in BAR0.

The plain variant has no server, no peers, no interrupt pin and no MSI-X, so its registers are
storage a driver can probe: IVPOSITION reads 0 and a doorbell goes nowhere.
"""

from __future__ import annotations

from ..pci import BAR_MEM64, Bar, PciFunction, adjusted_read, adjusted_write

REG_BAR_SIZE = 256
SHMEM_SIZE = 1 << 20
INTRMASK, INTRSTATUS, IVPOSITION = 0, 4, 8
VM_ID = 0  # a position comes from the ivshmem server, which the plain device never has


class Ivshmem(PciFunction):
    vendor_id = 0x1AF4
    device_id = 0x1110
    revision = 1
    class_code = 0x050000
    model = "ivshmem"

    def __init__(self) -> None:
        super().__init__()
        self.add_bar(0, Bar(REG_BAR_SIZE))
        self.add_bar(2, Bar(SHMEM_SIZE, kind=BAR_MEM64, prefetch=True, ram=True))
        self.intrmask = 0
        self.intrstatus = 0

    def _read_reg(self, addr: int) -> int:
        """Reads decode the exact address: only aligned ones hit a register."""
        if addr == INTRMASK:
            return self.intrmask
        if addr == INTRSTATUS:
            value, self.intrstatus = self.intrstatus, 0
            return value
        return VM_ID if addr == IVPOSITION else 0

    def _write_reg(self, addr: int, value: int) -> None:
        """Writes drop the low address bits; the doorbell (12) has no peers to ring."""
        addr &= 0xFC
        if addr == INTRMASK:
            self.intrmask = value
        elif addr == INTRSTATUS:
            self.intrstatus = value

    def mmio_read(self, bar: int, offset: int, size: int) -> int:
        """The rest of BAR0's page, which a mapping can reach, is unassigned: it reads 0."""
        return adjusted_read(self._read_reg, offset, size) if offset < REG_BAR_SIZE else 0

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if offset < REG_BAR_SIZE:
            adjusted_write(self._write_reg, offset, size, value)
