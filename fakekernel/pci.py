"""Emulated PCI hardware: what sits behind vfio-pci in the fake kernel.

This is the device side only (raw config space with write masks, BARs, the INTx line, MSI and
MSI-X delivery, DMA through the IOMMU), built the way QEMU's hw/pci builds it; the masked config
write and MSI-X are vfio_impl.hw.pci's, the one PCI core every model here shares. What vfio-pci
does on top of it lives in vfio_pci.py.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Callable

from vfio_impl.hw.pci import MSIXDevice, default_write_config
from vfio_impl.uapi.pci_regs import *  # noqa: F403

# Words QEMU and the kernel use that <linux/pci_regs.h> does not export.
PCI_PM_CAP_VER_1_1 = 0x0002
PCI_D3HOT = 3
PCI_MSIX_BIR = 0x7
PCIE_LINK_X1 = 0x1
PCIE_LINK_2_5GT = 0x1
PCI_EXP_VER1_SIZEOF = 0x14

PCI_ERR_VER = 2
PCI_ERR_SIZEOF = 0x48
# QEMU's PCI_ERR_UNC_SUPPORTED: every uncorrectable error bit but Undefined.
PCI_ERR_UNC_SUPPORTED = 0x03FFF030
PCI_ERR_UNC_SEVERITY_DEFAULT = (PCI_ERR_UNC_DLP | PCI_ERR_UNC_SURPDN | PCI_ERR_UNC_FCP | PCI_ERR_UNC_RX_OVER
                                | PCI_ERR_UNC_MALF_TLP | PCI_ERR_UNC_INTN)
PCI_ERR_COR_SUPPORTED = 0x0000F1C1
PCI_ERR_COR_MASK_DEFAULT = 0x0000E000

BAR_MEM32 = 0x0
BAR_MEM64 = 0x4
BAR_IO = 0x1
BAR_PREFETCH = 0x8

IMPL_ACCESS_SIZE = 4
log = logging.getLogger("fakekernel.pci")


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


def _mask(size: int) -> int:
    return (1 << (8 * size)) - 1


def adjusted_read(read_reg: Callable[[int], int], offset: int, size: int) -> int:
    """QEMU's access_with_adjusted_size for registers implemented 4 bytes wide: a narrower read
    gets the low bytes of the register its address selects, a wider one is split in two."""
    if size < IMPL_ACCESS_SIZE:
        return read_reg(offset) & _mask(size)
    return sum((read_reg(offset + i) & _mask(IMPL_ACCESS_SIZE)) << (8 * i) for i in range(0, size, IMPL_ACCESS_SIZE))


def adjusted_write(write_reg: Callable[[int, int], None], offset: int, size: int, value: int) -> None:
    """The write side: a narrower write stores its zero-extended value in the whole register."""
    for i in range(0, max(size, IMPL_ACCESS_SIZE), IMPL_ACCESS_SIZE):
        write_reg(offset + i, (value >> (8 * i)) & _mask(IMPL_ACCESS_SIZE))


class PciFunction(MSIXDevice):
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
    # Whether Linux finds a reset for the function, and whether it is the PM D3hot-D0 cycle
    # (pm_reset) rather than a function level reset (reset).
    reset_works = False
    reset_by_pm = False

    def __init__(self) -> None:
        size = PCI_CFG_SPACE_EXP_SIZE if self.pcie else PCI_CFG_SPACE_SIZE
        self.config = bytearray(size)
        self.wmask = bytearray(size)
        self.bars: list[Bar | None] = [None] * 6
        self.rom: bytes | None = None
        self.caps: list[Capability] = []
        self.ext_caps: list[Capability] = []
        self.sinks = Sinks()
        self.intx_level = False
        self._build_header()

    def _build_header(self) -> None:
        """QEMU's pci_init_wmask: COMMAND, cache line and interrupt line are writable in the
        header, and everything past it is until a capability claims the bytes."""
        c = self.config
        struct.pack_into("<HH", c, 0, self.vendor_id, self.device_id)
        c[PCI_REVISION_ID] = self.revision
        c[PCI_CLASS_PROG:PCI_CLASS_PROG + 3] = self.class_code.to_bytes(3, "little")
        struct.pack_into("<HH", c, PCI_SUBSYSTEM_VENDOR_ID, self.subsystem_vendor_id, self.subsystem_id)
        c[PCI_INTERRUPT_PIN] = self.interrupt_pin
        struct.pack_into("<H", self.wmask, PCI_COMMAND,
                         PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE
                         | PCI_COMMAND_SERR)
        self.wmask[0x0C] = 0xFF
        self.wmask[PCI_INTERRUPT_LINE] = 0xFF
        self.wmask[PCI_STD_HEADER_SIZEOF:] = b"\xff" * (len(c) - PCI_STD_HEADER_SIZEOF)

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
        """Chains the new capability at the end of the list (QEMU's pci_add_capability puts it at
        the head, so devices add theirs in chain order); its bytes are read-only until the
        capability opens some of them."""
        c = self.config
        if self.caps:
            c[self.caps[-1].offset + 1] = offset
        else:
            c[PCI_CAPABILITY_LIST] = offset
            struct.pack_into("<H", c, PCI_STATUS, struct.unpack_from("<H", c, PCI_STATUS)[0] | PCI_STATUS_CAP_LIST)
        c[offset] = cap_id
        c[offset + 1] = 0
        self.wmask[offset:offset + size] = bytes(size)
        self.caps.append(Capability(cap_id, offset, size))

    def add_ext_capability(self, cap_id: int, version: int, offset: int, size: int) -> None:
        """QEMU's pcie_add_capability: the first one sits at 0x100, later ones are chained after it."""
        if self.ext_caps:
            last = self.ext_caps[-1].offset
            header = self.config_read(last, 4) & 0x000FFFFF
            struct.pack_into("<I", self.config, last, header | (offset << 20))
        struct.pack_into("<I", self.config, offset, cap_id | (version << 16))
        self.wmask[offset:offset + size] = bytes(size)
        self.ext_caps.append(Capability(cap_id, offset, size))

    def add_pm(self, offset: int, pmc: int, ctrl_wmask: int) -> None:
        self.add_capability(PCI_CAP_ID_PM, offset, PCI_PM_SIZEOF)
        struct.pack_into("<H", self.config, offset + PCI_PM_PMC, PCI_PM_CAP_VER_1_1 | pmc)
        struct.pack_into("<H", self.wmask, offset + PCI_PM_CTRL, ctrl_wmask)

    def add_msi(self, offset: int, vectors_log2: int, is_64bit: bool, maskbit: bool) -> None:
        size = 0xA + (4 if is_64bit else 0) + (0xA if maskbit else 0)
        self.add_capability(PCI_CAP_ID_MSI, offset, size)
        flags = vectors_log2 << 1
        flags |= PCI_MSI_FLAGS_64BIT if is_64bit else 0
        flags |= PCI_MSI_FLAGS_MASKBIT if maskbit else 0
        struct.pack_into("<H", self.config, offset + PCI_MSI_FLAGS, flags)
        struct.pack_into("<H", self.wmask, offset + PCI_MSI_FLAGS, PCI_MSI_FLAGS_ENABLE | PCI_MSI_FLAGS_QSIZE)
        self.wmask[offset + 4:offset + size] = b"\xff" * (size - 4)

    def add_pcie_v1(self, offset: int) -> None:
        """QEMU's pcie_endpoint_cap_v1_init: a version 1 endpoint on a x1 2.5 GT/s link, port 0."""
        self.add_capability(PCI_CAP_ID_EXP, offset, PCI_EXP_VER1_SIZEOF)
        struct.pack_into("<H", self.config, offset + PCI_EXP_FLAGS, (PCI_EXP_TYPE_ENDPOINT << 4) | 1)
        struct.pack_into("<I", self.config, offset + PCI_EXP_DEVCAP, PCI_EXP_DEVCAP_RBER)
        struct.pack_into("<I", self.config, offset + PCI_EXP_LNKCAP,
                         PCI_EXP_LNKCAP_ASPM_L0S | (PCIE_LINK_X1 << 4) | PCIE_LINK_2_5GT)
        struct.pack_into("<H", self.config, offset + PCI_EXP_LNKSTA, (PCIE_LINK_X1 << 4) | PCIE_LINK_2_5GT)

    def add_aer(self, offset: int) -> None:
        """QEMU's pcie_aer_init with no header log; its Uncorrectable Error Mask stays read-only,
        as the real runner's QEMU 7.2 answers."""
        self.add_ext_capability(PCI_EXT_CAP_ID_ERR, PCI_ERR_VER, offset, PCI_ERR_SIZEOF)
        for reg, value, wmask in ((PCI_ERR_UNCOR_SEVER, PCI_ERR_UNC_SEVERITY_DEFAULT, PCI_ERR_UNC_SUPPORTED),
                                  (PCI_ERR_COR_MASK, PCI_ERR_COR_MASK_DEFAULT, PCI_ERR_COR_SUPPORTED),
                                  (PCI_ERR_CAP, PCI_ERR_CAP_ECRC_GENC | PCI_ERR_CAP_ECRC_CHKC,
                                   PCI_ERR_CAP_ECRC_GENE | PCI_ERR_CAP_ECRC_CHKE)):
            struct.pack_into("<I", self.config, offset + reg, value)
            struct.pack_into("<I", self.wmask, offset + reg, wmask)

    def add_dsn(self, offset: int, serial: int) -> None:
        self.add_ext_capability(PCI_EXT_CAP_ID_DSN, 1, offset, PCI_EXT_CAP_DSN_SIZEOF)
        struct.pack_into("<Q", self.config, offset + 4, serial)

    def add_msix(self, offset: int, vectors: int, bar: int, table: int, pba: int) -> None:
        """QEMU's msix_init with table and PBA in one BAR: every vector starts masked. The models
        here send on any vector their registers name, so all are in use."""
        self.add_capability(PCI_CAP_ID_MSIX, offset, PCI_CAP_MSIX_SIZEOF)
        self.msix_init(offset, vectors, bar, table, bar, pba)
        for vector in range(vectors):
            self.msix_vector_use(vector)

    def bar_address(self, index: int) -> int:
        """Where firmware placed the BAR: its register without the type bits."""
        bar = self.bars[index]
        low = self.config_read(PCI_BASE_ADDRESS_0 + 4 * index, 4)
        high = self.config_read(PCI_BASE_ADDRESS_0 + 4 * index + 4, 4) if bar.kind == BAR_MEM64 else 0
        return (high << 32) | (low & ~(0x3 if bar.kind == BAR_IO else 0xF))

    def find_cap(self, cap_id: int) -> Capability | None:
        """Every MSI raised asks for its capability; a loop costs half a generator's next()."""
        for cap in self.caps:
            if cap.cap_id == cap_id:
                return cap
        return None

    def msi_cap(self) -> Capability | None:
        return self.find_cap(PCI_CAP_ID_MSI)

    def msi_enabled(self) -> bool:
        cap = self.msi_cap()
        return bool(cap) and bool(self.config_read(cap.offset + PCI_MSI_FLAGS, 2) & PCI_MSI_FLAGS_ENABLE)

    # -- MSI-X: the table and PBA live in a BAR, the enable and function mask in config ---------
    def msix_layout(self) -> tuple[int, int, int] | None:
        """(BAR, table offset, PBA offset) from the capability's table and PBA dwords; None without MSI-X."""
        cap = self.find_cap(PCI_CAP_ID_MSIX)
        if cap is None:
            return None
        table, pba = struct.unpack_from("<II", self.config, cap.offset + PCI_MSIX_TABLE)
        return table & PCI_MSIX_BIR, table & ~PCI_MSIX_BIR, pba & ~PCI_MSIX_BIR

    def msix_flags(self) -> int:
        cap = self.find_cap(PCI_CAP_ID_MSIX)
        return self.config_read(cap.offset + PCI_MSIX_FLAGS, 2) if cap else 0

    def msix_notify(self, vector: int) -> None:
        """The models send only with MSI-X on (QEMU 7.2's ivshmem asks msix_enabled first), so with
        it off nothing waits in the PBA."""
        if self.msix_enabled():
            super().msix_notify(vector)

    def msix_trigger(self, vector: int) -> None:
        self.msi_notify(vector)

    def msix_enable(self, on: bool) -> None:
        """Linux enables MSI-X with the function unmasked and every vector still masked."""
        cap = self.find_cap(PCI_CAP_ID_MSIX)
        flags = self.msix_flags() & ~(PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
        struct.pack_into("<H", self.config, cap.offset + PCI_MSIX_FLAGS, flags | (PCI_MSIX_FLAGS_ENABLE if on else 0))
        self.msix_write_config(cap.offset + PCI_MSIX_FLAGS, 2)

    def msix_bar_read(self, offset: int, size: int) -> int:
        """The table and PBA take 4- and 8-byte accesses; anything else in the BAR reads 0."""
        _, table, pba = self.msix_layout()
        if size in (4, 8):
            if table <= offset < table + len(self.msix_table):
                return self.msix_table_mmio_read(offset - table, size)
            if pba <= offset < pba + len(self.msix_pba):
                return self.msix_pba_mmio_read(offset - pba, size)
        return 0

    def msix_bar_write(self, offset: int, size: int, value: int) -> None:
        """Table writes take effect per entry; the PBA is read-only."""
        _, table, _ = self.msix_layout()
        if table <= offset < table + len(self.msix_table) and size in (4, 8):
            self.msix_table_mmio_write(offset - table, value, size)

    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        """pci_default_write_config: the write mask, then what MSI-X makes of the control byte."""
        default_write_config(self.config, self.wmask, offset, value, size)
        self.msix_write_config(offset, size)

    def command(self) -> int:
        return self.config_read(PCI_COMMAND, 2)

    def bus_master(self) -> bool:
        """Asked on every MSI and DMA; the bit is in COMMAND's low byte."""
        return bool(self.config[PCI_COMMAND] & PCI_COMMAND_MASTER)

    def set_irq(self, level: bool) -> None:
        """Drive the INTx pin; the status bit follows it as in PCI 2.3. Driving it to the level it
        already has changes nothing, as in QEMU's pci_irq_handler."""
        if level == self.intx_level:
            return
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
        """No bus master, no DMA: the request never leaves the device, and only a WARNING says so."""
        if self.bus_master():
            return self.sinks.dma_read(addr, size)
        self._dma_dropped("read", addr, size)
        return None

    def dma_write(self, addr: int, data: bytes) -> bool:
        if self.bus_master():
            return self.sinks.dma_write(addr, data)
        self._dma_dropped("write", addr, len(data))
        return False

    def _dma_dropped(self, direction: str, addr: int, size: int) -> None:
        log.warning("%s: DMA %s of %d bytes at %#x dropped: bus master is off in COMMAND",
                    self.model, direction, size, addr)

    def start(self, watch: Callable[[int, Callable[[], None] | None], None]) -> None:
        """A device that works in the background (a server socket, eventfds) begins here, on the
        kernel's worker: `watch(fd, callback)` runs callback whenever fd is readable."""

    def stop(self) -> None:
        """close_all: the device lets go of every fd it holds."""

    def ram_fd(self, index: int) -> int | None:
        """The memory behind a RAM BAR when the device brings its own (ivshmem-doorbell's shared
        memory); None lets vfio-pci back the BAR with a memfd of its own."""
        return None

    def mmio_read(self, bar: int, offset: int, size: int) -> int:
        return 0xFFFFFFFFFFFFFFFF >> (64 - 8 * size)

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        pass

    def pm_reset(self) -> None:
        """Linux's pci_pm_reset: D3hot and back to D0 through PMCSR. QEMU 7.2 devices keep all
        their state across it, which is why the real runner's e1000e comes back unchanged."""
        ctrl = self.find_cap(PCI_CAP_ID_PM).offset + PCI_PM_CTRL
        csr = self.config_read(ctrl, 2) & ~PCI_PM_CTRL_STATE_MASK
        self.config_write(ctrl, 2, csr | PCI_D3HOT)
        self.config_write(ctrl, 2, csr)

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
