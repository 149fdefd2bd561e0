"""The two pieces of QEMU's PCI core (hw/pci/pci.c) that every emulated config space here needs:
the vfio-pci flavour's view of a device and the ivshmem device model both keep a config space
and its write mask as QEMU's PCIDevice does."""

from __future__ import annotations

from .uapi.pci_regs import (PCI_BASE_ADDRESS_0, PCI_BASE_ADDRESS_IO_MASK, PCI_BASE_ADDRESS_MEM_MASK,
                            PCI_BASE_ADDRESS_MEM_TYPE_64, PCI_BASE_ADDRESS_SPACE_IO)

PCI_NUM_BARS = 6  # QEMU's name; the header has no such constant
U32 = 0xFFFFFFFF


def register_bar(config: bytearray, wmask: bytearray, nr: int, size: int, attr: int) -> None:
    """pci_register_bar: the BAR register holds the type bits `attr`, its write mask the size, so
    a guest sizing the BAR reads the size back."""
    off = PCI_BASE_ADDRESS_0 + 4 * nr
    mask = ~(size - 1)
    io = attr & PCI_BASE_ADDRESS_SPACE_IO
    config[off:off + 4] = (attr & U32).to_bytes(4, "little")
    wmask[off:off + 4] = (mask & (PCI_BASE_ADDRESS_IO_MASK if io else PCI_BASE_ADDRESS_MEM_MASK) & U32).to_bytes(4, "little")
    if not io and attr & PCI_BASE_ADDRESS_MEM_TYPE_64 and nr + 1 < PCI_NUM_BARS:
        wmask[off + 4:off + 8] = ((mask >> 32) & U32).to_bytes(4, "little")


def default_write_config(config: bytearray, wmask: bytearray, addr: int, value: int, size: int) -> None:
    """The first half of pci_default_write_config: only the bits the write mask allows change."""
    for i in range(size):
        m = wmask[addr + i]
        config[addr + i] = (config[addr + i] & ~m) | ((value >> (8 * i)) & m)
