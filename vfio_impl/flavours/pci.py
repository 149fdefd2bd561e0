"""vfio-pci: a host PCI function assigned to a guest, as early QEMU's hw/vfio/pci.c does it.

The guest sees an emulated copy of config space for the ROM BAR and the MSI/MSI-X
capabilities and the device itself for the rest; BARs are mmapped with a trapped slow path
beneath them (turned on around a user-space INTx so a BAR access can serve as the EOI); the
MSI-X table and PBA are emulated in the BAR hole, as QEMU's msix.c does. The Machine stands in
for the rest of QEMU: its loop, virtual clock, IRQ lines and MSI delivery, and, when it offers
irqfd, KVM's: INTx then goes to an irqfd with a resample eventfd, and each MSI or MSI-X vector
to an irqfd on a route to its message.
"""

from __future__ import annotations

import errno
import functools
import mmap as _mmap
import os
from contextlib import ExitStack
from dataclasses import dataclass, field

from vfio_impl import uapi
from vfio_impl.core import irq
from vfio_impl.core.container import AddressSpace
from vfio_impl.core.device import Device
from vfio_impl.core.errors import VFIOError
from vfio_impl.core.pciaddr import PCI_DEVICES, parse_host
from vfio_impl.core.region import MmapArea, Region
from vfio_impl.core.trace import error_report, trace, tracing, warn
from vfio_impl.hw.pci import (
    MSIX_CAP_LENGTH,
    PCI_NUM_BARS,
    MSIXDevice,
    default_write_config,
    msix_layout_valid,
    msix_pba_size,
    register_bar,
)
from vfio_impl.uapi.pci_regs import *  # noqa: F403
from vfio_impl.vmm.machine import IRQLine, Machine, MSIRoute, Timer

# QEMU's words beside <linux/pci_regs.h>'s.
PCI_HEADER_TYPE_MULTI_FUNCTION = 0x80
PCI_CONFIG_HEADER_SIZE = 0x40
PCI_CONFIG_SPACE_SIZE = 0x100
PCI_ROM_SLOT = 6

INTX, MSI, MSIX = uapi.VFIO_PCI_INTX_IRQ_INDEX, uapi.VFIO_PCI_MSI_IRQ_INDEX, uapi.VFIO_PCI_MSIX_IRQ_INDEX
ROM_INDEX, CONFIG_INDEX = uapi.VFIO_PCI_ROM_REGION_INDEX, uapi.VFIO_PCI_CONFIG_REGION_INDEX
_PAGE = _mmap.PAGESIZE
# The access sizes a guest's BAR and config accesses come in, with their value masks.
_ACCESS_MASKS = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF}
VFIO_INT_NONE, VFIO_INT_INTX, VFIO_INT_MSI, VFIO_INT_MSIX = "none", "intx", "msi", "msix"


def _ranges_overlap(a: int, alen: int, b: int, blen: int) -> bool:
    return a < b + blen and b < a + alen


def _ones(size: int) -> int:
    return (1 << (8 * size)) - 1


@dataclass(slots=True)
class VFIOBAR:
    """One BAR: the region behind it and the type the guest sees."""

    nr: int
    region: Region
    ioport: bool = False
    mem64: bool = False
    prefetch: bool = False
    # (start, end, read, write) ranges emulated by vfio_impl itself: the MSI-X table and PBA.
    traps: list = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.region.size

    @property
    def areas(self) -> list[MmapArea]:
        return self.region.areas


@dataclass(slots=True)
class VFIOINTx:
    pin: int = 0
    pending: bool = False
    kvm_accel: bool = False
    line: IRQLine | None = None
    route: str | None = None
    interrupt: int = -1
    unmask: int = -1
    mmap_timeout: int = 1100
    mmap_timer: Timer | None = None


@dataclass(slots=True)
class VFIOMSIVector:
    """One MSI/MSI-X vector; fd is -1 once released, msg the (address, data) it was set up with,
    virq its KVM route when the machine's irqfd sends it."""

    nr: int
    use: bool = False
    fd: int = -1
    msg: tuple[int, int] | None = None
    virq: MSIRoute | None = None


@dataclass(slots=True)
class VFIOMSIXInfo:
    """MSI-X layout read before the BARs are mapped, and where the capability went; the table and
    PBA are the PCI core's (MSIXDevice). `noresize` is the kernel's VFIO_IRQ_INFO_NORESIZE: without
    it (Linux 6.5 and later) a vector can be added while MSI-X stays enabled."""

    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int
    entries: int
    noresize: bool
    cap: int = 0

    @property
    def table_size(self) -> int:
        return self.entries * PCI_MSIX_ENTRY_SIZE


def _parse_host(host: str) -> str:
    try:
        return parse_host(host)
    except ValueError:
        raise VFIOError(f"Property 'vfio-pci.host' doesn't take value '{host}'", errno.EINVAL) from None


class VFIOPCIDevice(MSIXDevice):
    """A realized vfio-pci device: the guest's config space, BARs and interrupts."""

    def __init__(self, space: AddressSpace, machine: Machine, name: str, *, romfile: str | None, rombar: int,
                 x_intx_mmap_timeout_ms: int, x_kvm_intx: bool, irq_line: str | None, multifunction: bool):
        self.space = space
        self.host = space.host
        self.machine = machine
        self.name = name
        self.romfile = romfile
        self.rombar = rombar
        self.x_kvm_intx = x_kvm_intx
        self.multifunction = multifunction
        self.vbasedev: Device | None = None
        self.config = bytearray(PCI_CONFIG_SPACE_SIZE)
        self.wmask = bytearray(PCI_CONFIG_SPACE_SIZE)
        self.config_region: Region | None = None
        self.bars: list[VFIOBAR] = []
        self.rom: bytearray | None = None
        self.rom_region: Region | None = None
        self.reset_works = False
        self.interrupt = VFIO_INT_NONE
        self.intx = VFIOINTx(mmap_timeout=x_intx_mmap_timeout_ms, route=irq_line)
        self.vectors: list[VFIOMSIVector] = []
        self.nr_vectors = 0
        self.msi_cap = 0
        self.msi_cap_size = 0
        self.msix: VFIOMSIXInfo | None = None

    # -- realize / exit -----------------------------------------------------------------------
    @classmethod
    def realize(cls, space: AddressSpace, machine: Machine, *, host: str | None = None,
                sysfsdev: str | None = None, romfile: str | None = None, rombar: int = 1,
                x_intx_mmap_timeout_ms: int = 1100, x_kvm_intx: bool = True, irq_line: str | None = None,
                multifunction: bool = False) -> "VFIOPCIDevice":
        """vfio_initfn: every step undone in reverse if a later one fails."""
        if machine is not space.machine:
            raise VFIOError("vfio: the machine must be the address space's machine", errno.EINVAL)
        if sysfsdev:
            sysfsdev = sysfsdev.rstrip("/")
            name = os.path.basename(sysfsdev)
        elif host:
            name = _parse_host(host)
            sysfsdev = f"{PCI_DEVICES}/{name}"
        else:
            raise VFIOError("No provided host device", errno.EINVAL)
        self = cls(space, machine, name, romfile=romfile, rombar=rombar,
                   x_intx_mmap_timeout_ms=x_intx_mmap_timeout_ms, x_kvm_intx=x_kvm_intx, irq_line=irq_line,
                   multifunction=multifunction)
        with ExitStack() as unwind:
            self.vbasedev = Device.attach(space, sysfsdev, name, populate=self._get_device)
            unwind.callback(self.vbasedev.close)
            self._copy_config()
            self._load_rom()
            self._early_setup_msix()
            unwind.callback(self._unmap_bars)
            self._map_bars()
            unwind.callback(self._teardown_msi)
            self._add_capabilities()
            if self.config_read(PCI_INTERRUPT_PIN, 1):
                self.intx.mmap_timer = machine.new_timer(self._intx_mmap_enable)
                unwind.callback(self._free_mmap_timer)
                self._enable_intx()
            unwind.pop_all()
        trace("vfio_pci_realize", name=name)
        return self

    def exit(self) -> None:
        """vfio_exitfn: interrupts, timer, MSI state, BAR mappings, then the device and group."""
        if self.vbasedev is None:
            return
        if self.vbasedev.fd >= 0:
            self._disable_interrupts()
            if self.interrupt == VFIO_INT_INTX:
                # Leaving MSI or MSI-X brought INTx back, and with it perhaps KVM's irqfd.
                self._disable_intx()
        self._free_mmap_timer()
        self._teardown_msi()
        self._unmap_bars()
        self.vbasedev.close()
        self.vbasedev = None
        trace("vfio_pci_exit", name=self.name)

    def __enter__(self) -> "VFIOPCIDevice":
        return self

    def __exit__(self, *exc) -> None:
        self.exit()

    def _get_device(self, dev: Device) -> None:
        """The PCI half of vfio_get_device: flags, counts, and the info of BARs, ROM and config."""
        if not dev.flags & uapi.VFIO_DEVICE_FLAGS_PCI:
            raise VFIOError("vfio: Um, this isn't a PCI device", errno.EINVAL)
        self.reset_works = dev.reset_works
        if not self.reset_works:
            warn(f"Warning, device {self.name} does not support reset")
        if dev.num_regions < CONFIG_INDEX + 1:
            raise VFIOError(f"vfio: unexpected number of io regions {dev.num_regions}", errno.EINVAL)
        if dev.num_irqs < MSIX + 1:
            raise VFIOError(f"vfio: unexpected number of irqs {dev.num_irqs}", errno.EINVAL)
        for nr in range(PCI_NUM_BARS):
            self.bars.append(VFIOBAR(nr, dev.region(nr)))
        self.rom_region = self._region_info(dev, ROM_INDEX, "ROM")
        self.config_region = self._region_info(dev, CONFIG_INDEX, "config")

    @staticmethod
    def _region_info(dev: Device, index: int, what: str) -> Region:
        try:
            return dev.region(index)
        except VFIOError as e:
            raise VFIOError(f"vfio: Error getting {what} info", e.errno) from e

    def _copy_config(self) -> None:
        """A copy of config space, with the host's BAR and ROM addresses cleared out of it."""
        size = min(PCI_CONFIG_SPACE_SIZE, self.config_region.size)
        try:
            data = self.config_region.pread(0, size)
        except VFIOError as e:
            raise VFIOError("vfio: Failed to read device config space", e.errno) from e
        if len(data) < size:
            raise VFIOError("vfio: Failed to read device config space", errno.EFAULT)
        self.config[:size] = data
        self.config[PCI_BASE_ADDRESS_0:PCI_BASE_ADDRESS_0 + 4 * PCI_NUM_BARS] = bytes(4 * PCI_NUM_BARS)
        self.config[PCI_ROM_ADDRESS:PCI_ROM_ADDRESS + 4] = bytes(4)
        cmd = (PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_PARITY | PCI_COMMAND_SERR
               | PCI_COMMAND_INTX_DISABLE)
        self._set(PCI_COMMAND, 2, cmd, self.wmask)
        for off in (PCI_CACHE_LINE_SIZE, PCI_LATENCY_TIMER, PCI_INTERRUPT_LINE):
            self.wmask[off] = 0xFF

    # -- ROM ----------------------------------------------------------------------------------
    def _load_rom(self) -> None:
        """vfio_load_rom: read what the ROM gives, 0xff beyond it; a failure leaves no ROM."""
        size = self.rom_region.size
        if self.romfile or not self.rombar or not size:
            if self.romfile and self.rombar:
                self._register_rom(self._read_romfile())
            return
        trace("vfio_load_rom", name=self.name, size=size)
        rom = bytearray(b"\xff" * size)
        off = 0
        fd, base = self.vbasedev.fd, self.rom_region.info.offset
        while size:
            try:
                chunk = self.host.pread(fd, size, base + off)
            except OSError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN):
                    continue
                error_report(f"vfio: Error reading device ROM: {os.strerror(e.errno or 0)}")
                return
            if not chunk:
                break
            rom[off:off + len(chunk)] = chunk
            off += len(chunk)
            size -= len(chunk)
        self._register_rom(bytes(rom))

    def _read_romfile(self) -> bytes:
        """QEMU's PCI core loads a romfile, padded to a power of two, instead of the device's ROM."""
        try:
            with open(self.romfile, "rb") as f:
                image = f.read()
        except OSError as e:
            raise VFIOError.from_oserror(f"failed to find romfile \"{self.romfile}\"", e) from e
        size = 1 << max(len(image) - 1, 0).bit_length()
        return image.ljust(size, b"\xff")

    def _register_rom(self, rom: bytes) -> None:
        """The ROM BAR is RAM holding the image (the seed's memory_region_init_ram): the guest
        reads the option ROM there, and what it writes changes the copy, never the device."""
        self.rom = bytearray(rom)
        self._set(PCI_ROM_ADDRESS, 4, (~(len(rom) - 1) & 0xFFFFF800) | PCI_ROM_ADDRESS_ENABLE, self.wmask)

    # -- BARs ---------------------------------------------------------------------------------
    def _early_setup_msix(self) -> None:
        """MSI-X's table location is needed before the BARs are mapped, so it is read first."""
        pos = self._find_capability(PCI_CAP_ID_MSIX)
        if not pos:
            return
        try:
            ctrl = int.from_bytes(self.config_region.pread(pos + PCI_MSIX_FLAGS, 2), "little")
            table = int.from_bytes(self.config_region.pread(pos + PCI_MSIX_TABLE, 4), "little")
            pba = int.from_bytes(self.config_region.pread(pos + PCI_MSIX_PBA, 4), "little")
        except VFIOError as e:
            raise VFIOError("vfio: failed to read PCI MSI-X capability", e.errno) from e
        try:
            irq_flags = self.vbasedev.get_irq_info(MSIX).flags
        except VFIOError as e:
            raise VFIOError("vfio: failed to get MSI-X irq info", e.errno) from e
        self.msix = VFIOMSIXInfo(table & PCI_MSIX_FLAGS_BIRMASK, table & ~PCI_MSIX_FLAGS_BIRMASK,
                                 pba & PCI_MSIX_FLAGS_BIRMASK, pba & ~PCI_MSIX_FLAGS_BIRMASK,
                                 (ctrl & PCI_MSIX_FLAGS_QSIZE) + 1, bool(irq_flags & uapi.VFIO_IRQ_INFO_NORESIZE))
        trace("vfio_msix_early_setup", name=self.name, pos=pos, table_bar=self.msix.table_bar,
              offset=self.msix.table_offset, entries=self.msix.entries, noresize=self.msix.noresize)

    def _find_capability(self, cap_id: int) -> int:
        if not self.config[PCI_STATUS] & PCI_STATUS_CAP_LIST:
            return 0
        pos, seen = self.config[PCI_CAPABILITY_LIST], set()
        while pos and pos not in seen:
            if self.config[pos] == cap_id:
                return pos
            seen.add(pos)
            pos = self.config[pos + 1]
        return 0

    def _map_bars(self) -> None:
        for bar in self.bars:
            self._map_bar(bar)

    def _map_bar(self, bar: VFIOBAR) -> None:
        """A trapped path under every BAR; mmaps around the MSI-X table unless it is mappable."""
        if not bar.size:
            return
        try:
            raw = int.from_bytes(self.config_region.pread(PCI_BASE_ADDRESS_0 + 4 * bar.nr, 4), "little")
        except VFIOError as e:
            error_report(f"vfio: Failed to read BAR {bar.nr} ({os.strerror(e.errno)})")
            return
        bar.ioport = bool(raw & PCI_BASE_ADDRESS_SPACE_IO)
        kind = raw & ~(PCI_BASE_ADDRESS_IO_MASK if bar.ioport else PCI_BASE_ADDRESS_MEM_MASK)
        bar.mem64 = not bar.ioport and bool(kind & PCI_BASE_ADDRESS_MEM_TYPE_64)
        bar.prefetch = not bar.ioport and bool(kind & PCI_BASE_ADDRESS_MEM_PREFETCH)
        register_bar(self.config, self.wmask, bar.nr, bar.size, kind)
        hole = None
        msix = self.msix
        if msix and msix.table_bar == bar.nr and not bar.region.info.cap(uapi.MsixMappableCap):
            hole = (msix.table_offset, msix.table_size)
        try:
            bar.region.mmap(hole)
        except VFIOError:
            error_report(f"VFIO {self.name} BAR {bar.nr} mmap unsupported. Performance may be slow")

    def _unmap_bars(self) -> None:
        for bar in self.bars:
            bar.region.munmap()

    def _mmap_set_enabled(self, enabled: bool) -> None:
        for bar in self.bars:
            if bar.size:
                bar.region.mmap_enabled = enabled
        trace("vfio_mmap_set_enabled", name=self.name, enabled=enabled)

    def mmap_enabled(self, bar: int | None = None) -> bool:
        """Whether guest BAR accesses take the mmap fast path (one BAR, or all mapped BARs)."""
        if bar is not None:
            return self.bars[bar].region.mmap_enabled and bool(self.bars[bar].areas)
        mapped = [b for b in self.bars if b.areas]
        return bool(mapped) and all(b.region.mmap_enabled for b in mapped)

    # -- guest BAR access ---------------------------------------------------------------------
    def _rom_span(self, addr: int, size: int) -> slice:
        if self.rom is None or not 0 <= addr <= len(self.rom) - size:
            raise VFIOError(f"vfio: no {size}-byte access at ROM BAR+{addr:#x}", errno.EINVAL)
        return slice(addr, addr + size)

    def bar_read(self, nr: int, addr: int, size: int) -> int:
        """The guest reads a BAR: MSI-X emulation, else the mmap, else a trapped pread and an EOI.
        PCI_ROM_SLOT is the ROM BAR, plain RAM: no trap, no EOI."""
        if size not in _ACCESS_MASKS:
            raise VFIOError(f"vfio: unsupported read size, {size} bytes", errno.EINVAL)
        if nr == PCI_ROM_SLOT:
            return int.from_bytes(self.rom[self._rom_span(addr, size)], "little")
        bar = self.bars[nr]
        if bar.traps:
            for start, end, read, _ in bar.traps:
                if start <= addr < end:
                    return read(addr - start, size)
        value = bar.region.read_mapped(addr, size)
        if value is not None:
            return value
        try:
            data = bar.region.pread(addr, size)
        except VFIOError as e:
            error_report(f"vfio_bar_read(BAR{nr}+{addr:#x}, {size}) failed: {os.strerror(e.errno)}")
            return _ones(size)
        self._eoi()
        return int.from_bytes(data, "little")

    def bar_write(self, nr: int, addr: int, value: int, size: int) -> None:
        """The guest writes a BAR; a trapped write is an EOI even when it fails, as in the seed."""
        mask = _ACCESS_MASKS.get(size)
        if mask is None:
            raise VFIOError(f"vfio: unsupported write size, {size} bytes", errno.EINVAL)
        value &= mask
        if nr == PCI_ROM_SLOT:
            self.rom[self._rom_span(addr, size)] = value.to_bytes(size, "little")
            return
        bar = self.bars[nr]
        if bar.traps:
            for start, end, _, write in bar.traps:
                if start <= addr < end:
                    write(addr - start, value, size)
                    return
        if bar.region.write_mapped(addr, value, size):
            return
        try:
            bar.region.pwrite(addr, value.to_bytes(size, "little"))
        except VFIOError as e:
            error_report(f"vfio_bar_write(BAR{nr}+{addr:#x}, {value:#x}, {size}) failed: {os.strerror(e.errno)}")
        self._eoi()

    # -- config space -------------------------------------------------------------------------
    @staticmethod
    def _get(off: int, size: int, buf: bytearray) -> int:
        return int.from_bytes(buf[off:off + size], "little")

    @staticmethod
    def _set(off: int, size: int, value: int, buf: bytearray) -> None:
        buf[off:off + size] = (value & _ones(size)).to_bytes(size, "little")

    def _emulated(self, addr: int, size: int) -> bool:
        return (_ranges_overlap(addr, size, PCI_ROM_ADDRESS, 4)
                or (self.msix_cap and _ranges_overlap(addr, size, self.msix_cap, MSIX_CAP_LENGTH))
                or (self.msi_cap and _ranges_overlap(addr, size, self.msi_cap, self.msi_cap_size)))

    def config_read(self, addr: int, size: int) -> int:
        """Emulated ROM BAR and MSI/MSI-X capabilities, the device for the rest; multifunction virtual."""
        if size not in _ACCESS_MASKS:
            raise VFIOError(f"vfio: unsupported config read size, {size} bytes", errno.EINVAL)
        if addr + size > PCI_CONFIG_SPACE_SIZE:
            return _ones(size)
        if self._emulated(addr, size):
            val = self._get(addr, size, self.config)
        else:
            try:
                val = int.from_bytes(self.config_region.pread(addr, size), "little")
            except VFIOError as e:
                error_report(f"vfio_pci_read_config({self.name}, {addr:#x}, {size:#x}) failed: "
                             f"{os.strerror(e.errno)}")
                return _ones(size)
        if _ranges_overlap(addr, size, PCI_HEADER_TYPE, 1):
            mask = PCI_HEADER_TYPE_MULTI_FUNCTION << (8 * (PCI_HEADER_TYPE - addr))
            val = (val | mask) if self.multifunction else (val & ~mask)
        trace("vfio_pci_read_config", name=self.name, addr=addr, len=size, val=val)
        return val

    def config_write(self, addr: int, value: int, size: int) -> None:
        """Everything goes to the device first; the header and MSI/MSI-X also to the emulation."""
        if size not in _ACCESS_MASKS:
            raise VFIOError(f"vfio: unsupported config write size, {size} bytes", errno.EINVAL)
        if addr + size > PCI_CONFIG_SPACE_SIZE:
            return
        value &= _ones(size)
        trace("vfio_pci_write_config", name=self.name, addr=addr, val=value, len=size)
        try:
            self.config_region.pwrite(addr, value.to_bytes(size, "little"))
        except VFIOError as e:
            error_report(f"vfio_pci_write_config({self.name}, {addr:#x}, {value:#x}, {size:#x}) failed: "
                         f"{os.strerror(e.errno)}")
        if addr < PCI_CONFIG_HEADER_SIZE:
            self._default_write_config(addr, value, size)
            return
        if self.msi_cap and _ranges_overlap(addr, size, self.msi_cap, self.msi_cap_size):
            self._write_cap(addr, value, size, self._msi_enabled, self._enable_msi, self._disable_msi)
        if self.msix_cap and _ranges_overlap(addr, size, self.msix_cap, MSIX_CAP_LENGTH):
            self._write_cap(addr, value, size, self.msix_enabled, self._enable_msix, self._disable_msix)

    def _write_cap(self, addr: int, value: int, size: int, enabled, enable, disable) -> None:
        """The emulated capability takes the write; an enable transition switches the interrupt mode."""
        was = enabled()
        self._default_write_config(addr, value, size)
        now = enabled()
        if now and not was:
            enable()
        elif was and not now:
            disable()

    def _default_write_config(self, addr: int, value: int, size: int) -> None:
        """pci_default_write_config: writable bits only, then the MSI and MSI-X hooks."""
        default_write_config(self.config, self.wmask, addr, value, size)
        self._msi_write_config(addr, size)
        self.msix_write_config(addr, size)

    # -- capabilities -------------------------------------------------------------------------
    def _add_capabilities(self) -> None:
        if not self.config[PCI_STATUS] & PCI_STATUS_CAP_LIST or not self.config[PCI_CAPABILITY_LIST]:
            return
        self._add_std_cap(self.config[PCI_CAPABILITY_LIST])

    def _std_cap_max_size(self, pos: int) -> int:
        nxt, tmp = 0xFF, self.config[PCI_CAPABILITY_LIST]
        while tmp:
            if pos < tmp < nxt:
                nxt = tmp
            tmp = self.config[tmp + 1]
        return nxt - pos

    def _add_std_cap(self, pos: int) -> None:
        """Insert from the end of the chain, each at the head, so the chain matches the device."""
        cap_id, nxt = self.config[pos], self.config[pos + 1]
        size = self._std_cap_max_size(pos)
        if nxt:
            self._add_std_cap(nxt)
        else:
            self.config[PCI_CAPABILITY_LIST] = 0
        try:
            if cap_id == PCI_CAP_ID_MSI:
                self._setup_msi(pos)
            elif cap_id == PCI_CAP_ID_MSIX:
                self._setup_msix(pos)
            else:
                self._add_capability(cap_id, pos, size)
        except VFIOError as e:
            raise VFIOError(f"vfio: {self.name} Error adding PCI capability {cap_id:#x}[{size:#x}]@{pos:#x}: "
                            f"{e.message}", e.errno) from e

    def _add_capability(self, cap_id: int, pos: int, size: int) -> None:
        self.config[pos] = cap_id
        self.config[pos + 1] = self.config[PCI_CAPABILITY_LIST]
        self.config[PCI_CAPABILITY_LIST] = pos
        self.config[PCI_STATUS] |= PCI_STATUS_CAP_LIST
        self.wmask[pos:pos + size] = bytes(size)

    def _setup_msi(self, pos: int) -> None:
        """msi_init over the device's own MSI capability: same vectors, 64-bit and mask bits."""
        try:
            ctrl = int.from_bytes(self.config_region.pread(pos + PCI_MSI_FLAGS, 2), "little")
        except VFIOError as e:
            raise VFIOError("vfio: failed to read PCI MSI FLAGS", e.errno) from e
        is64 = bool(ctrl & PCI_MSI_FLAGS_64BIT)
        maskbit = bool(ctrl & PCI_MSI_FLAGS_MASKBIT)
        size = 0xA + (0xA if maskbit else 0) + (0x4 if is64 else 0)
        self._add_capability(PCI_CAP_ID_MSI, pos, size)
        self._set(pos + PCI_MSI_FLAGS, 2, ctrl & (PCI_MSI_FLAGS_QMASK | PCI_MSI_FLAGS_64BIT | PCI_MSI_FLAGS_MASKBIT),
                  self.config)
        self._set(pos + PCI_MSI_FLAGS, 2, PCI_MSI_FLAGS_QSIZE | PCI_MSI_FLAGS_ENABLE, self.wmask)
        self._set(pos + 4, 4, 0xFFFFFFFC, self.wmask)
        if is64:
            self._set(pos + 8, 4, 0xFFFFFFFF, self.wmask)
        self._set(self._msi_data_off(pos, is64), 2, 0xFFFF, self.wmask)
        if maskbit:
            entries = 1 << ((ctrl & PCI_MSI_FLAGS_QMASK) >> 1)
            self._set(self._msi_data_off(pos, is64) + 4, 4, _ones(4) >> (32 - entries), self.wmask)
        self.msi_cap, self.msi_cap_size = pos, size

    @staticmethod
    def _msi_data_off(pos: int, is64: bool) -> int:
        return pos + (12 if is64 else 8)

    def _setup_msix(self, pos: int) -> None:
        """msix_init: the table and PBA must fit their BARs without overlapping."""
        msix = self.msix
        table_bar, pba_bar = self.bars[msix.table_bar], self.bars[msix.pba_bar]
        if not msix_layout_valid(msix.entries, msix.table_offset, table_bar.size, msix.pba_offset, pba_bar.size,
                                 same_bar=msix.table_bar == msix.pba_bar):
            error_report("vfio: msix_init failed")
            raise VFIOError("vfio: msix_init failed", errno.EINVAL)
        self._add_capability(PCI_CAP_ID_MSIX, pos, MSIX_CAP_LENGTH)
        self.msix_init(pos, msix.entries, msix.table_bar, msix.table_offset, msix.pba_bar, msix.pba_offset)
        msix.cap = pos
        table_bar.traps.append((msix.table_offset, msix.table_offset + msix.table_size,
                                self.msix_table_mmio_read, self.msix_table_mmio_write))
        pba_end = msix.pba_offset + msix_pba_size(msix.entries)
        pba_bar.traps.append((msix.pba_offset, pba_end, self.msix_pba_mmio_read, lambda addr, value, size: None))

    def _teardown_msi(self) -> None:
        """msi_uninit and msix_uninit: the capabilities go, and the table stops trapping."""
        self.msi_cap = self.msi_cap_size = 0
        for bar in self.bars:
            bar.traps.clear()
        self.msix_uninit()

    # -- INTx ---------------------------------------------------------------------------------
    def _intx_mmap_enable(self) -> None:
        """The mmap timer: BARs go back to the fast path once no interrupt is pending."""
        if self.intx.pending:
            self.intx.mmap_timer.mod(self.machine.clock.now_ms() + self.intx.mmap_timeout)
            return
        self._mmap_set_enabled(True)

    def _intx_interrupt(self) -> None:
        intx = self.intx
        if not self.host.eventfd_read(intx.interrupt):
            return
        trace("vfio_intx_interrupt", name=self.name, pin="ABCD"[intx.pin])
        intx.pending = True
        intx.line.set(True)
        self._mmap_set_enabled(False)
        if intx.mmap_timeout:
            intx.mmap_timer.mod(self.machine.clock.now_ms() + intx.mmap_timeout)

    def _eoi(self) -> None:
        """Any trapped BAR access ends a pending INTx: lower the line, then let the device fire again."""
        intx = self.intx
        if not intx.pending:
            return
        trace("vfio_intx_eoi", name=self.name)
        intx.pending = False
        intx.line.set(False)
        self._unmask_intx()

    def _unmask_intx(self) -> None:
        try:
            self.vbasedev.unmask_irq(INTX)
        except VFIOError as e:
            error_report(str(e))

    def _mask_intx(self) -> None:
        try:
            self.vbasedev.mask_irq(INTX)
        except VFIOError as e:
            error_report(str(e))

    def _free_intx_unmask(self) -> None:
        self.vbasedev.free_eventfd(self.intx.unmask)
        self.intx.unmask = -1

    def _enable_intx_kvm(self) -> None:
        """vfio_enable_intx_kvm, where the machine offers KVM's irqfd with resample: the trigger
        eventfd asserts the guest line in "KVM", the guest's EOI there writes the resample eventfd,
        and VFIO unmasks on it. No interrupt reaches this device's code, so the BAR mmaps stay on
        and no BAR access is an EOI. Any failure leaves INTx in user space, reported."""
        intx = self.intx
        if not self.x_kvm_intx or not self.machine.irqfd_available or intx.route is None:
            return
        self.machine.set_fd_handler(intx.interrupt, None)
        self._mask_intx()
        intx.pending = False
        intx.line.set(False)
        with ExitStack() as fail:
            fail.callback(self._unmask_intx)
            fail.callback(self.machine.set_fd_handler, intx.interrupt, self._intx_interrupt)
            try:
                intx.unmask = self.vbasedev.new_eventfd()
            except VFIOError:
                error_report("vfio: Error: event_notifier_init failed eoi")
                return
            fail.callback(self._free_intx_unmask)
            try:
                self.machine.add_irqfd(intx.interrupt, intx.line, intx.unmask)
            except OSError as e:
                error_report(f"vfio: Error: Failed to setup resample irqfd: {os.strerror(e.errno)}")
                return
            fail.callback(self.machine.remove_irqfd, intx.interrupt)
            try:
                self.vbasedev.set_irq_signaling(INTX, 0, uapi.VFIO_IRQ_SET_ACTION_UNMASK, intx.unmask)
            except VFIOError as e:
                error_report(f"vfio: Error: Failed to setup INTx unmask fd: {os.strerror(e.errno)}")
                return
            fail.pop_all()
        self._unmask_intx()
        intx.kvm_accel = True
        trace("vfio_intx_enable_kvm", name=self.name, route=intx.route)

    def _disable_intx_kvm(self) -> None:
        """Back to user space: masked, line low, KVM lets go of the trigger, the resample eventfd
        closed (VFIO drops its unmask with it), the handler back, then unmask to catch a lost edge."""
        intx = self.intx
        if not intx.kvm_accel:
            return
        self._mask_intx()
        intx.pending = False
        intx.line.set(False)
        self.machine.remove_irqfd(intx.interrupt)
        self._free_intx_unmask()
        self.machine.set_fd_handler(intx.interrupt, self._intx_interrupt)
        intx.kvm_accel = False
        self._unmask_intx()
        trace("vfio_intx_disable_kvm", name=self.name)

    def update_irq(self, route: str | None) -> None:
        """vfio_update_irq: the guest moved the pin's route (a machine line name; None when the
        router cannot hand it to KVM, which keeps INTx in user space on the current line)."""
        if self.interrupt != VFIO_INT_INTX or route == self.intx.route:
            return
        trace("vfio_intx_update", name=self.name, old=self.intx.route, new=route)
        self._disable_intx_kvm()
        self.intx.route = route
        if route is not None:
            self.intx.line = self.machine.irq_line(route)
            self._enable_intx_kvm()
        self._eoi()

    def _enable_intx(self) -> None:
        pin = self.config_read(PCI_INTERRUPT_PIN, 1)
        # 0 is no pin; past INTD is the 0xff of a read that failed, and config_read reported it.
        if not 1 <= pin <= len("ABCD"):
            return
        self._disable_interrupts()
        intx = self.intx
        intx.pin = pin - 1
        if intx.route is None:
            intx.route = f"{self.name} INT{'ABCD'[intx.pin]}"
        intx.line = self.machine.irq_line(intx.route)
        try:
            intx.interrupt = self.vbasedev.new_eventfd()
        except VFIOError as e:
            raise VFIOError("vfio: Error: event_notifier_init failed", e.errno) from e
        self.machine.set_fd_handler(intx.interrupt, self._intx_interrupt)
        try:
            self.vbasedev.set_irq_signaling(INTX, 0, uapi.VFIO_IRQ_SET_ACTION_TRIGGER, intx.interrupt)
        except VFIOError as e:
            self.vbasedev.free_eventfd(intx.interrupt)
            intx.interrupt = -1
            raise VFIOError("vfio: Error: Failed to setup INTx fd", e.errno) from e
        self._enable_intx_kvm()
        self.interrupt = VFIO_INT_INTX
        trace("vfio_intx_enable", name=self.name)

    def _disable_intx(self) -> None:
        intx = self.intx
        intx.mmap_timer.delete()
        self._disable_intx_kvm()
        self._disable_irqindex(INTX)
        intx.pending = False
        intx.line.set(False)
        self._mmap_set_enabled(True)
        self.vbasedev.free_eventfd(intx.interrupt)
        intx.interrupt = -1
        self.interrupt = VFIO_INT_NONE
        trace("vfio_intx_disable", name=self.name)

    def _free_mmap_timer(self) -> None:
        if self.intx.mmap_timer:
            self.intx.mmap_timer.delete()
            self.intx.mmap_timer = None

    def _disable_irqindex(self, index: int) -> None:
        """Errors ignored, as the seed ignores them: the index may already be off in the kernel."""
        try:
            self.vbasedev.disable_irq(index)
        except VFIOError as e:
            trace("vfio_disable_irqindex_failed", name=self.name, index=index, errno=e.errno)

    def _enable_intx_or_report(self) -> None:
        try:
            self._enable_intx()
        except VFIOError as e:
            error_report(str(e))

    def _disable_interrupts(self) -> None:
        {VFIO_INT_INTX: self._disable_intx, VFIO_INT_MSI: self._disable_msi,
         VFIO_INT_MSIX: self._disable_msix}.get(self.interrupt, lambda: None)()

    # -- MSI and MSI-X: vfio's side -----------------------------------------------------------
    @property
    def msi_vectors(self) -> list[VFIOMSIVector]:
        return self.vectors if self.interrupt == VFIO_INT_MSI else []

    @property
    def msix_vectors(self) -> list[VFIOMSIVector]:
        return self.vectors if self.interrupt == VFIO_INT_MSIX else []

    def _msi_interrupt(self, vector: VFIOMSIVector) -> None:
        if not self.host.eventfd_read(vector.fd):
            return
        if tracing():
            trace("vfio_msi_interrupt", name=self.name, vector=vector.nr)
        if self.interrupt == VFIO_INT_MSIX:
            self.msix_notify(vector.nr)
        elif self.interrupt == VFIO_INT_MSI:
            self._msi_notify(vector.nr)
        else:
            error_report("vfio: MSI interrupt received, but not enabled?")

    def _enable_vectors(self, msix: bool) -> int:
        """SET_IRQS for vectors 0..nr_vectors-1; unused ones get -1. Returns the ioctl's answer."""
        fds = [v.fd if v.use else -1 for v in self.vectors[:self.nr_vectors]]
        try:
            return self.vbasedev.set_irqs(irq.eventfds(MSIX if msix else MSI, 0, fds))
        except OSError as e:
            return -(e.errno or errno.EIO)

    def _new_vector_fd(self, vector: VFIOMSIVector, handler: bool) -> None:
        """The vector's eventfd goes to KVM when the machine routes its message, else to the
        loop's handler (none for the vector MSI-X enable uses and releases at once)."""
        vector.fd = self.vbasedev.new_eventfd()
        if vector.msg is not None and self._add_kvm_msi_virq(vector):
            return
        if handler:
            self.machine.set_fd_handler(vector.fd, functools.partial(self._msi_interrupt, vector))

    def _add_kvm_msi_virq(self, vector: VFIOMSIVector) -> bool:
        """An MSI route for the message and an irqfd on it; False (and nothing held) when the
        machine gives either no, as the seed then defaults to user space."""
        try:
            route = self.machine.add_msi_route(*vector.msg)
        except OSError:
            return False
        try:
            self.machine.add_irqfd(vector.fd, route)
        except OSError:
            self.machine.release_virq(route)
            return False
        vector.virq = route
        return True

    def _free_vector_fd(self, vector: VFIOMSIVector) -> None:
        if vector.virq is not None:
            self.machine.remove_irqfd(vector.fd)
            self.machine.release_virq(vector.virq)
            vector.virq = None
        self.vbasedev.free_eventfd(vector.fd)
        vector.fd = -1
        vector.use = False

    def _msix_vector_do_use(self, nr: int, msg: tuple[int, int] | None, handler: bool) -> None:
        """A vector past nr_vectors is a resize. With NORESIZE the kernel allocates vectors only at
        enable, so MSI-X goes off and comes back with nr + 1 of them; without it the new vector is
        one SET_IRQS on its subindex, and nr_vectors is only the upper bound of those in use."""
        trace("vfio_msix_vector_do_use", name=self.name, vector=nr)
        vector = self.vectors[nr]
        vector.use = True
        vector.msg = msg
        self.msix_vector_use(nr)
        try:
            self._new_vector_fd(vector, handler)
        except VFIOError:
            vector.use = False
            error_report("vfio: Error: event_notifier_init failed")
            return
        resizing = self.nr_vectors < nr + 1
        if resizing:
            self.nr_vectors = nr + 1
        if self.msix.noresize and resizing:
            self._disable_irqindex(MSIX)
            ret = self._enable_vectors(True)
            if ret:
                error_report(f"vfio: failed to enable vectors, {ret}")
            return
        try:
            self.vbasedev.set_irq_signaling(MSIX, nr, uapi.VFIO_IRQ_SET_ACTION_TRIGGER, vector.fd)
        except VFIOError as e:
            error_report(f"vfio: failed to modify vector, {-e.errno}")

    def _msix_vector_use(self, nr: int, msg: tuple[int, int]) -> None:
        """The use notifier: an unmasked vector gets an eventfd whose interrupts the loop takes."""
        self._msix_vector_do_use(nr, msg, True)

    def _msix_vector_release(self, nr: int) -> None:
        trace("vfio_msix_vector_release", name=self.name, vector=nr)
        vector = self.vectors[nr]
        self.msix_vector_unuse(nr)
        try:
            self.vbasedev.set_irq_signaling(MSIX, nr, uapi.VFIO_IRQ_SET_ACTION_TRIGGER, -1)
        except VFIOError as e:
            trace("vfio_msix_vector_release_failed", name=self.name, vector=nr, errno=e.errno)
        self._free_vector_fd(vector)

    def _enable_msix_no_vec(self) -> int:
        """MSI-X on with no vector wired: vector 0 given fd -1. Returns the ioctl's answer."""
        try:
            return self.vbasedev.set_irqs(irq.eventfds(MSIX, 0, [-1]))
        except OSError as e:
            return -(e.errno or errno.EIO)

    def _enable_msix(self) -> None:
        self._disable_interrupts()
        self.vectors = [VFIOMSIVector(nr) for nr in range(self.msix.entries)]
        self.interrupt = VFIO_INT_MSIX
        # A guest (Linux's pci_enable_msix) sets ENABLE long before it unmasks a vector, and some
        # devices' firmware watches the physical MSI-X state, so the device is put in MSI-X mode
        # with no vectors, which is what the guest sees. With NORESIZE, by using vector 0 and
        # releasing it at once. Without it, by a SET_IRQS of vector 0 with fd -1, sent before the
        # notifiers: a vector the guest already unmasked is then added alone, where the first
        # SET_IRQS on an index still off would allocate every vector up to its subindex.
        if self.msix.noresize:
            self._msix_vector_do_use(0, None, False)
            self._msix_vector_release(0)
        else:
            ret = self._enable_msix_no_vec()
            if ret:
                error_report(f"vfio: failed to enable MSI-X, {ret}")
        self.msix_set_vector_notifiers(self._msix_vector_use, self._msix_vector_release)
        trace("vfio_msix_enable", name=self.name)

    def _enable_msi(self) -> None:
        """One eventfd per allocated vector; if the kernel grants fewer, try again with that many."""
        self._disable_interrupts()
        self.nr_vectors = self._msi_nr_vectors_allocated()
        while True:
            self.vectors = [VFIOMSIVector(nr, msg=self._msi_get_message(nr)) for nr in range(self.nr_vectors)]
            try:
                for vector in self.vectors:
                    vector.use = True
                    self._new_vector_fd(vector, True)
            except VFIOError:
                error_report("vfio: Error: event_notifier_init failed")
                ret = -errno.EMFILE
            else:
                ret = self._enable_vectors(False)
            if not ret:
                break
            if ret < 0:
                error_report(f"vfio: Error: Failed to setup MSI fds: {os.strerror(-ret)}")
            elif ret != self.nr_vectors:
                error_report(f"vfio: Error: Failed to enable {self.nr_vectors} MSI vectors, retry with {ret}")
            for vector in self.vectors:
                if vector.fd >= 0:
                    self._free_vector_fd(vector)
            self.vectors = []
            if ret > 0 and ret != self.nr_vectors:
                self.nr_vectors = ret
                continue
            self.nr_vectors = 0
            return
        self.interrupt = VFIO_INT_MSI
        trace("vfio_msi_enable", name=self.name, nr_vectors=self.nr_vectors)

    def _disable_msi_common(self) -> None:
        self.vectors = []
        self.nr_vectors = 0
        self.interrupt = VFIO_INT_NONE
        self._enable_intx_or_report()

    def _disable_msix(self) -> None:
        """Without NORESIZE the index is cleared even with no vector used: MSI-X was enabled with
        none (QEMU's fix d2b668fca565 to its 8.1 vfio_enable_msix_no_vec)."""
        self.msix_unset_vector_notifiers(lambda nr: self.vectors[nr].use)
        if self.nr_vectors or not self.msix.noresize:
            self._disable_irqindex(MSIX)
        for vector in self.vectors:
            if vector.use:
                self.msix_vector_unuse(vector.nr)
                self._free_vector_fd(vector)
        self._disable_msi_common()
        trace("vfio_msix_disable", name=self.name)

    def _disable_msi(self) -> None:
        self._disable_irqindex(MSI)
        for vector in self.vectors:
            self._free_vector_fd(vector)
        self._disable_msi_common()
        trace("vfio_msi_disable", name=self.name)

    # -- MSI: the guest's side (QEMU's msi.c) -------------------------------------------------
    def _msi_flags(self) -> int:
        return self._get(self.msi_cap + PCI_MSI_FLAGS, 2, self.config)

    def _msi_enabled(self) -> bool:
        return bool(self.msi_cap) and bool(self._msi_flags() & PCI_MSI_FLAGS_ENABLE)

    def _msi_nr_vectors_allocated(self) -> int:
        return 1 << ((self._msi_flags() & PCI_MSI_FLAGS_QSIZE) >> 4)

    def _msi_get_message(self, nr: int, flags: int | None = None) -> tuple[int, int]:
        """`flags` as the caller just read them, so an interrupt reads the capability once."""
        if flags is None:
            flags = self._msi_flags()
        is64 = bool(flags & PCI_MSI_FLAGS_64BIT)
        address = self._get(self.msi_cap + 4, 8 if is64 else 4, self.config)
        data = self._get(self._msi_data_off(self.msi_cap, is64), 2, self.config)
        nr_vectors = 1 << ((flags & PCI_MSI_FLAGS_QSIZE) >> 4)
        return address, (data & ~(nr_vectors - 1)) | nr

    def _msi_mask_off(self, flags: int | None = None) -> int:
        if flags is None:
            flags = self._msi_flags()
        return self._msi_data_off(self.msi_cap, bool(flags & PCI_MSI_FLAGS_64BIT)) + 4

    def _msi_notify(self, nr: int) -> None:
        """A masked vector only sets its pending bit; the unmask delivers it."""
        flags = self._msi_flags()
        if flags & PCI_MSI_FLAGS_MASKBIT:
            off = self._msi_mask_off(flags)
            if self._get(off, 4, self.config) & (1 << nr):
                self._set(off + 4, 4, self._get(off + 4, 4, self.config) | (1 << nr), self.config)
                return
        address, data = self._msi_get_message(nr, flags)
        if tracing():
            trace("msi_notify", name=self.name, vector=nr, address=address, data=data)
        self.machine.msi_notify(address, data)

    def _msi_write_config(self, addr: int, size: int) -> None:
        """With MSI on: clamp the vector count to what the device offers, and deliver newly
        unmasked pending vectors. While it is off the count stays as the guest wrote it."""
        if not self.msi_cap or not _ranges_overlap(addr, size, self.msi_cap, self.msi_cap_size):
            return
        flags = self._msi_flags()
        if not flags & PCI_MSI_FLAGS_ENABLE:
            return
        log_max = (flags & PCI_MSI_FLAGS_QMASK) >> 1
        if (flags & PCI_MSI_FLAGS_QSIZE) >> 4 > log_max:
            flags = (flags & ~PCI_MSI_FLAGS_QSIZE) | (log_max << 4)
            self._set(self.msi_cap + PCI_MSI_FLAGS, 2, flags, self.config)
        if not flags & PCI_MSI_FLAGS_MASKBIT:
            return
        off = self._msi_mask_off()
        mask, pending = self._get(off, 4, self.config), self._get(off + 4, 4, self.config)
        for nr in range(self._msi_nr_vectors_allocated()):
            bit = 1 << nr
            if pending & bit and not mask & bit:
                pending &= ~bit
                self._set(off + 4, 4, pending, self.config)
                self._msi_notify(nr)

    # -- MSI-X: the guest's side is the PCI core's (MSIXDevice) ----------------------------------
    def msix_trigger(self, nr: int) -> None:
        address, data = self.msix_get_message(nr)
        if tracing():
            trace("msix_notify", name=self.name, vector=nr, address=address, data=data)
        self.machine.msi_notify(address, data)

    # -- reset --------------------------------------------------------------------------------
    def reset(self) -> None:
        """vfio_pci_reset: interrupts off, no decode or bus master, a device reset if it has one."""
        trace("vfio_pci_reset", name=self.name)
        self._disable_interrupts()
        cmd = self.config_read(PCI_COMMAND, 2)
        cmd &= ~(PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE)
        self.config_write(PCI_COMMAND, cmd, 2)
        if self.reset_works:
            try:
                self.vbasedev.reset()
            except VFIOError as e:
                error_report(str(e))
        self._enable_intx_or_report()

    def hot_reset_info(self) -> list[tuple[int, int, int, int]]:
        """The devices a bus reset would take along: (group, segment, bus, devfn) each.

        Asked once with room for none; the kernel answers ENOSPC with the count, then again.
        """
        head, dep = uapi.vfio_pci_hot_reset_info, uapi.vfio_pci_dependent_device
        buf = head.pack(argsz=head.size)
        try:
            self.host.ioctl(self.vbasedev.fd, uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, buf)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise VFIOError.from_oserror(
                    f"vfio: Cannot reset device {self.name}, no available reset mechanism.", e) from e
        count = head.unpack(buf).count
        buf = bytearray(head.size + count * dep.size)
        head.pack_into(buf, 0, argsz=len(buf))
        try:
            self.host.ioctl(self.vbasedev.fd, uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, buf)
        except OSError as e:
            raise VFIOError.from_oserror("vfio: hot reset info failed", e) from e
        devices = []
        for i in range(head.unpack(buf).count):
            d = dep.unpack(buf, head.size + i * dep.size)
            devices.append((d.group_id, d.segment, d.bus, d.devfn))
        return devices
