"""What SeaBIOS and Linux leave behind before any driver runs: BARs placed, decode enabled, the IRQ line routed."""

from __future__ import annotations

import struct

from . import pci
from .topology import PciDeviceSpec

MMIO_WINDOW = 0xFE000000
IO_WINDOW = 0xC000


def pci_setup(specs: list[PciDeviceSpec], functions: dict[str, pci.PciFunction]) -> None:
    """SeaBIOS's pci_setup, cut down: a topology may give the addresses the real runner's firmware
    chose (its edu reads COMMAND 0x0103 and BAR0 0xfe400000); other BARs are packed into the
    memory and I/O windows."""
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
