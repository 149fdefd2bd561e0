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

from .err import error
from .eventfd import EventfdCtx
from .irq import ACTION_MASK, IRQContext, validate_and_prepare, wants
from .mmio import MMIOMapping, split_access
from . import pci
from .uaccess import buf_arg, copy_from_user
from .vfio_main import VFIO_PCI_OFFSET_MASK, VFIO_PCI_OFFSET_SHIFT, VfioDevice
from .virqfd import virqfd_add, virqfd_disable

if TYPE_CHECKING:
    from .kernel import FakeKernel
    from .topology import PciDeviceSpec

# Sizes vfio_pci_bar_rw passes to the device as one access (ioread32/16/8) when aligned.
_ONE_ACCESS = frozenset({4, 2, 1})
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

UNASSIGNED = 0xFF
BASIC = 0
# pci_cap_length / pci_ext_cap_length: 0 hides a capability, None means its length is read from it.
# Capabilities whose length needs a walk the catalog never exercises (PCI-X, HyperTransport, SATA,
# VC, ACS, Resizable BAR, DPA, TPH) are left out, so the fake hides them where Linux shows them.
CAP_LENGTHS = {pci.PCI_CAP_ID_PM: pci.PCI_PM_SIZEOF, 0x02: 12, 0x03: 8, 0x04: 0, pci.PCI_CAP_ID_MSI: None,
               0x06: 0, 0x09: None, 0x0A: 0, 0x0B: 0, 0x0C: 0, 0x0D: 0, 0x0E: 0, 0x0F: 0,
               pci.PCI_CAP_ID_EXP: None, pci.PCI_CAP_ID_MSIX: pci.PCI_CAP_MSIX_SIZEOF, 0x13: 6}
EXT_CAP_LENGTHS = {pci.PCI_EXT_CAP_ID_ERR: 0x2C, pci.PCI_EXT_CAP_ID_DSN: pci.PCI_EXT_CAP_DSN_SIZEOF, 0x04: 0x10,
                   0x05: 0, 0x06: 0, 0x07: 0, 0x0A: 0, 0x0B: None, 0x0C: 0, 0x0E: 8, 0x0F: 8, 0x10: 0x40,
                   0x11: 0, 0x12: 40, 0x13: 16, 0x14: 0, 0x18: 8, 0x19: 0, 0x1A: 0, 0x1B: 0}
PCI_CAP_EXP_ENDPOINT_SIZEOF_V1 = 20
PCI_CAP_EXP_ENDPOINT_SIZEOF_V2 = 0x32
PCI_CAP_EXP_RC_ENDPOINT_SIZEOF_V1 = 12
PCI_CAP_EXP_RC_ENDPOINT_SIZEOF_V2 = 0x2C
# The error bits init_pci_ext_cap_err_perm lets a user write.
AER_UNC_WRITABLE = 0x03FFF031
AER_COR_WRITABLE = 0x0000F1C1
MSIX_REMAPPED_MSG = 0xFEE00018  # a remappable-format address, as Linux writes under intremap


class VfioPciDevice(VfioDevice):
    """The vfio-pci driver bound to one function; opened state lives here between device fds."""

    driver = "vfio-pci"

    def __init__(self, kernel: "FakeKernel", function: pci.PciFunction, spec: "PciDeviceSpec"):
        super().__init__(kernel, spec, spec.bdf)
        self.function = function
        self.bdf = spec.bdf
        self.reset_works = function.reset_works
        n = len(function.config)
        self.vconfig = bytearray(n)
        self.virt = bytearray(n)
        self.writable = bytearray(n)
        self.cap_map = bytearray(n)
        self.extended_caps = False
        self.bardirty = True
        self.msi_qmax = 0
        self.saved_state = b""
        self.ram: dict[int, int] = {}
        self.irq_type = IRQ_NONE
        self.intx = IRQContext()
        self.intx_unmask = None
        self.intx_masked = False
        self.virq_disabled = False
        self.msi_ctx: list[IRQContext] = []
        self.msi_irqs: dict[int, int] = {}
        self.err_trigger: EventfdCtx | None = None
        self.req_trigger: EventfdCtx | None = None
        self.msix_table = self._msix_table()
        self.has_dyn_msix = self.msix_table is not None and kernel.profile.msix_can_alloc_dyn
        self.regions: dict[int, tuple[int, int, list]] = {}
        function.sinks.intx = self._intx_line
        function.sinks.msi = self._msi_message
        function.sinks.dma_read = self._dma_read
        function.sinks.dma_write = self._dma_write

    def _msix_table(self) -> tuple[int, int, int] | None:
        """(BAR, start, end) of the MSI-X table, read once as vfio_pci_core_enable reads msix_bar,
        msix_offset and msix_size: the BIR, offset and table size are read-only in hardware."""
        f = self.function
        msix = f.msix_layout()
        if msix is None:
            return None
        bar, start, _ = msix
        return bar, start, start + ((f.msix_flags() & pci.PCI_MSIX_FLAGS_QSIZE) + 1) * pci.PCI_MSIX_ENTRY_SIZE

    # -- open / close -------------------------------------------------------------------------
    def open_device(self) -> None:
        """First open, as vfio_pci_core_enable: bus master off, a reset, the header saved for the
        last close, INTx unmasked, vconfig and its permissions, then which BARs can be mmapped."""
        self.open_count += 1
        if self.open_count > 1:
            return
        f = self.function
        f.config_write(pci.PCI_COMMAND, 2, f.command() & ~pci.PCI_COMMAND_MASTER)
        if self.reset_works:
            self._try_reset()
        self.saved_state = bytes(f.config[:pci.PCI_STD_HEADER_SIZEOF])
        f.config_write(pci.PCI_COMMAND, 2, f.command() & ~pci.PCI_COMMAND_INTX_DISABLE)
        self._config_init()
        for index, bar in enumerate(f.bars):
            if bar and bar.ram and index not in self.ram:
                own = f.ram_fd(index)
                if own is not None:
                    self.ram[index] = os.dup(own)
                    continue
                fd = os.memfd_create(f"vfio-{self.bdf}-bar{index}", os.MFD_CLOEXEC)
                os.ftruncate(fd, bar.size)
                self.ram[index] = fd
        self.regions = {index: self._region_info(index) for index in range(VGA)}

    def close_device(self) -> None:
        """Last close, as vfio_pci_core_disable: interrupts torn down, a reset, and the header
        saved at open written back, which also turns bus master off."""
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
        f.config_write(pci.PCI_COMMAND, 2, pci.PCI_COMMAND_INTX_DISABLE)
        if self.reset_works:
            self._reset_function()
        self._restore_header(self.saved_state)

    def release(self) -> None:
        for fd in self.ram.values():
            os.close(fd)
        self.ram.clear()

    # -- config space virtualization (vfio_pci_config.c) ----------------------------------------
    def _perm(self, offset: int, size: int, virt: int, write: int) -> None:
        for i in range(size):
            self.virt[offset + i] = (virt >> (8 * i)) & 0xFF
            self.writable[offset + i] = (write >> (8 * i)) & 0xFF

    def _config_init(self) -> None:
        """vfio_config_init: vconfig starts as the hardware's bytes. Bytes no capability claims
        stay raw (read from and written to the device, which applies its own write mask)."""
        f = self.function
        n = len(f.config)
        self.vconfig[:] = f.config
        self.virt[:] = bytes(n)
        self.writable[:] = b"\xff" * n
        self.cap_map[:] = bytes([UNASSIGNED]) * n
        self.cap_map[:pci.PCI_STD_HEADER_SIZEOF] = bytes(pci.PCI_STD_HEADER_SIZEOF)
        self.extended_caps = False
        self.bardirty = True
        self._perm(0, pci.PCI_STD_HEADER_SIZEOF, 0, 0)
        self._perm(pci.PCI_VENDOR_ID, 4, 0xFFFFFFFF, 0)
        self._perm(pci.PCI_COMMAND, 2, pci.PCI_COMMAND_INTX_DISABLE, 0xFFFF)
        self._perm(pci.PCI_STATUS, 2, pci.PCI_STATUS_CAP_LIST, 0)
        for off in (0x0C, 0x0D, 0x0F):
            self._perm(off, 1, 0, 0xFF)
        for off in list(range(pci.PCI_BASE_ADDRESS_0, pci.PCI_BASE_ADDRESS_0 + 24, 4)) + [pci.PCI_ROM_ADDRESS]:
            self._perm(off, 4, 0xFFFFFFFF, 0xFFFFFFFF)
        self._perm(pci.PCI_CAPABILITY_LIST, 1, 0xFF, 0)
        self._perm(pci.PCI_INTERRUPT_LINE, 1, 0xFF, 0xFF)
        self._perm(pci.PCI_INTERRUPT_PIN, 1, 0xFF, 0)
        self._cap_init()
        self._ecap_init()

    def _claim(self, cap_id: int, pos: int, length: int) -> None:
        """A capability vfio-pci shows: read-only from the hardware unless its table says more."""
        self.cap_map[pos:pos + length] = bytes([cap_id]) * length
        self._perm(pos, length, 0, 0)

    def _cap_init(self) -> None:
        """vfio_cap_init: walk the list, hiding capabilities vfio-pci does not know."""
        f = self.function
        prev = pci.PCI_CAPABILITY_LIST
        pos = f.config[prev] if f.config_read(pci.PCI_STATUS, 2) & pci.PCI_STATUS_CAP_LIST else 0
        loops = (pci.PCI_CFG_SPACE_SIZE - pci.PCI_STD_HEADER_SIZEOF) // 4
        shown = 0
        while pos and loops:
            loops -= 1
            cap_id, nxt = f.config[pos], f.config[pos + pci.PCI_CAP_LIST_NEXT]
            length = self._cap_length(cap_id, pos)
            if not length:
                self.vconfig[prev] = nxt
                pos = nxt
                continue
            self._claim(cap_id, pos, length)
            CAP_PERMS.get(cap_id, VfioPciDevice._direct_perms)(self, pos, length)
            prev = pos + pci.PCI_CAP_LIST_NEXT
            pos = nxt
            shown += 1
        if not shown:
            struct.pack_into("<H", self.vconfig, pci.PCI_STATUS,
                             struct.unpack_from("<H", self.vconfig, pci.PCI_STATUS)[0] & ~pci.PCI_STATUS_CAP_LIST)

    def _cap_length(self, cap_id: int, pos: int) -> int:
        length = CAP_LENGTHS.get(cap_id, 0)
        if length is not None:
            return length
        f = self.function
        if cap_id == pci.PCI_CAP_ID_MSI:
            flags = f.config_read(pos + pci.PCI_MSI_FLAGS, 2)
            return 0xA + (4 if flags & pci.PCI_MSI_FLAGS_64BIT else 0) + (0xA if flags & pci.PCI_MSI_FLAGS_MASKBIT else 0)
        if cap_id == pci.PCI_CAP_ID_EXP:
            if len(f.config) > pci.PCI_CFG_SPACE_SIZE:
                self.extended_caps = f.config_read(pci.PCI_CFG_SPACE_SIZE, 4) != 0
            flags = f.config_read(pos + pci.PCI_EXP_FLAGS, 2)
            rc_end = (flags & pci.PCI_EXP_FLAGS_TYPE) >> 4 == pci.PCI_EXP_TYPE_RC_END
            if flags & pci.PCI_EXP_FLAGS_VERS == 1:
                return PCI_CAP_EXP_RC_ENDPOINT_SIZEOF_V1 if rc_end else PCI_CAP_EXP_ENDPOINT_SIZEOF_V1
            return PCI_CAP_EXP_RC_ENDPOINT_SIZEOF_V2 if rc_end else PCI_CAP_EXP_ENDPOINT_SIZEOF_V2
        return f.config[pos + 2]

    def _direct_perms(self, pos: int, length: int) -> None:
        """vfio_direct_config_read: the hardware's bytes, but the ID and next pointer vfio-pci
        may have rewritten; writes are dropped."""
        self._perm(pos, 2, 0xFFFF, 0)

    def _pm_perms(self, pos: int, length: int) -> None:
        """PME cannot reach the user, so its support, enable and status bits read as 0; the power
        state is trapped, so its bits are not written through either."""
        self._perm(pos + pci.PCI_CAP_LIST_NEXT, 1, 0xFF, 0)
        self._perm(pos + pci.PCI_PM_PMC, 2, pci.PCI_PM_CAP_PME_MASK, 0)
        pme = pci.PCI_PM_CTRL_PME_ENABLE | pci.PCI_PM_CTRL_PME_STATUS
        self._perm(pos + pci.PCI_PM_CTRL, 4, pme, ~(pme | pci.PCI_PM_CTRL_STATE_MASK) & 0xFFFFFFFF)
        for off, bits in ((pci.PCI_PM_PMC, pci.PCI_PM_CAP_PME_MASK), (pci.PCI_PM_CTRL, pme)):
            struct.pack_into("<H", self.vconfig, pos + off, struct.unpack_from("<H", self.vconfig, pos + off)[0] & ~bits)

    def _msi_perms(self, pos: int, length: int) -> None:
        """init_pci_cap_msi_perm: flags, address and data are virtual; mask and pending are not."""
        flags = self.function.config_read(pos + pci.PCI_MSI_FLAGS, 2)
        self._perm(pos + pci.PCI_CAP_LIST_NEXT, 1, 0xFF, 0)
        self._perm(pos + pci.PCI_MSI_FLAGS, 1, 0xFF, 0xFF)
        self._perm(pos + 4, 4, 0xFFFFFFFF, 0xFFFFFFFF)
        data = 0x8
        if flags & pci.PCI_MSI_FLAGS_64BIT:
            self._perm(pos + 8, 4, 0xFFFFFFFF, 0xFFFFFFFF)
            data = 0xC
        self._perm(pos + data, 2, 0xFFFF, 0xFFFF)
        if flags & pci.PCI_MSI_FLAGS_MASKBIT:
            self._perm(pos + data + 4, 8, 0, (1 << 64) - 1)

    def _exp_perms(self, pos: int, length: int) -> None:
        """init_pci_cap_exp_perm: the user may write Device Control except Phantom Functions;
        FLR, payload and read request size are virtual; Device Control 2 all but ARI."""
        self._perm(pos + pci.PCI_CAP_LIST_NEXT, 1, 0xFF, 0)
        self._perm(pos + pci.PCI_EXP_DEVCTL, 2,
                   pci.PCI_EXP_DEVCTL_BCR_FLR | pci.PCI_EXP_DEVCTL_PAYLOAD | pci.PCI_EXP_DEVCTL_READRQ,
                   ~pci.PCI_EXP_DEVCTL_PHANTOM & 0xFFFF)
        if length > pci.PCI_EXP_DEVCTL2:
            self._perm(pos + pci.PCI_EXP_DEVCTL2, 2, 0, ~pci.PCI_EXP_DEVCTL2_ARI & 0xFFFF)

    def _ext_cap_length(self, ecap: int, pos: int) -> int:
        length = EXT_CAP_LENGTHS.get(ecap, 0)
        return self.function.config_read(pos + 4, 4) >> 20 if length is None else length

    def _ecap_init(self) -> None:
        """vfio_ecap_init: unknown extended capabilities are skipped in the chain; an unknown
        first one stays as a header with only its next pointer, since 0x100 anchors the list."""
        if not self.extended_caps:
            return
        f = self.function
        epos, prev, shown = pci.PCI_CFG_SPACE_SIZE, None, 0
        loops = (len(f.config) - pci.PCI_CFG_SPACE_SIZE) // 4
        while loops and epos >= pci.PCI_CFG_SPACE_SIZE:
            loops -= 1
            header = f.config_read(epos, 4)
            ecap, nxt = header & 0xFFFF, (header >> 20) & 0xFFC
            length = self._ext_cap_length(ecap, epos)
            if not length and prev is not None:
                old = struct.unpack_from("<I", self.vconfig, prev)[0]
                struct.pack_into("<I", self.vconfig, prev, (old & ~(0xFFC << 20)) | (nxt << 20))
                epos = nxt
                continue
            self._claim(ecap & 0xFF, epos, length or 4)
            self._perm(epos, 4, 0xFFFFFFFF, 0)
            if not length:
                struct.pack_into("<I", self.vconfig, epos, header & (0xFFC << 20))
            else:
                shown += 1
                if ecap == pci.PCI_EXT_CAP_ID_ERR:
                    self._aer_perms(epos)
            prev = epos
            epos = nxt
        if not shown:
            self.vconfig[pci.PCI_CFG_SPACE_SIZE:pci.PCI_CFG_SPACE_SIZE + 4] = bytes(4)

    def _aer_perms(self, pos: int) -> None:
        """init_pci_ext_cap_err_perm: error status, masks and severity, ECRC enables."""
        for reg, bits in ((pci.PCI_ERR_UNCOR_STATUS, AER_UNC_WRITABLE), (pci.PCI_ERR_UNCOR_MASK, AER_UNC_WRITABLE),
                          (pci.PCI_ERR_UNCOR_SEVER, AER_UNC_WRITABLE), (pci.PCI_ERR_COR_STATUS, AER_COR_WRITABLE),
                          (pci.PCI_ERR_COR_MASK, AER_COR_WRITABLE),
                          (pci.PCI_ERR_CAP, pci.PCI_ERR_CAP_ECRC_GENE | pci.PCI_ERR_CAP_ECRC_CHKE)):
            self._perm(pos + reg, 4, 0, bits)

    def _cap_start(self, pos: int) -> int:
        """vfio_find_cap_start: back to the first byte of the capability holding pos."""
        base = pci.PCI_CFG_SPACE_SIZE if pos >= pci.PCI_CFG_SPACE_SIZE else pci.PCI_STD_HEADER_SIZEOF
        cap = self.cap_map[pos]
        while pos - 1 >= base and self.cap_map[pos - 1] == cap:
            pos -= 1
        return pos

    def _bar_fixup(self) -> None:
        """vfio_bar_fixup: the virtual BARs keep only the bits their size lets a write set, plus
        the type bits, which is what BAR sizing reads back."""
        if not self.bardirty:
            return
        f = self.function
        index = 0
        while index < 6:
            off = pci.PCI_BASE_ADDRESS_0 + 4 * index
            bar = f.bars[index]
            if bar is None:
                struct.pack_into("<I", self.vconfig, off, 0)
                index += 1
                continue
            mask = ~(bar.size - 1)
            raw = struct.unpack_from("<I", self.vconfig, off)[0]
            struct.pack_into("<I", self.vconfig, off, (raw & mask & 0xFFFFFFFF) | bar.flags)
            if bar.kind == pci.BAR_MEM64:
                upper = struct.unpack_from("<I", self.vconfig, off + 4)[0]
                struct.pack_into("<I", self.vconfig, off + 4, upper & (mask >> 32) & 0xFFFFFFFF)
                index += 1
            index += 1
        rom = struct.unpack_from("<I", self.vconfig, pci.PCI_ROM_ADDRESS)[0]
        rom = rom & ((~(len(f.rom) - 1) & 0xFFFFFFFF) | 1) if f.rom else 0
        struct.pack_into("<I", self.vconfig, pci.PCI_ROM_ADDRESS, rom)
        self.bardirty = False

    def _default_read(self, pos: int, count: int) -> int:
        phys = self.function.config_read(pos, count)
        virt = int.from_bytes(self.virt[pos:pos + count], "little")
        return (phys & ~virt) | (int.from_bytes(self.vconfig[pos:pos + count], "little") & virt)

    def _default_write(self, pos: int, count: int, value: int) -> None:
        for i in range(count):
            w, v = self.writable[pos + i], self.virt[pos + i]
            if not w:
                continue
            b = (value >> (8 * i)) & 0xFF
            self.vconfig[pos + i] = (self.vconfig[pos + i] & ~(w & v)) | (b & w & v)
            phys_bits = w & ~v & 0xFF
            if phys_bits:
                cur = self.function.config[pos + i]
                self.function.config_write(pos + i, 1, (cur & ~phys_bits) | (b & phys_bits))

    def config_read(self, pos: int, count: int) -> int:
        """One access that stays inside one capability and one dword, as vfio_config_do_rw cuts them.

        vfio_msi_config_read also stores msi_qmax into vconfig, but at the capability's first byte
        rather than its flags, and that byte reads from the hardware: the flags stay as copied."""
        if self.cap_map[pos] == BASIC and pci.PCI_BASE_ADDRESS_0 <= pos < pci.PCI_ROM_ADDRESS + 4:
            self._bar_fixup()
        return self._default_read(pos, count)

    def config_write(self, pos: int, count: int, value: int) -> None:
        cap = self.cap_map[pos]
        self._default_write(pos, count, value)
        if cap == BASIC and pos < pci.PCI_CFG_SPACE_SIZE:
            self._basic_written(pos, value)
        elif pos < pci.PCI_CFG_SPACE_SIZE and cap == pci.PCI_CAP_ID_MSI:
            start = self._cap_start(pos)
            if pos - start <= pci.PCI_MSI_FLAGS <= pos - start + count:
                self._msi_flags_written(start)
        elif pos < pci.PCI_CFG_SPACE_SIZE and cap == pci.PCI_CAP_ID_EXP:
            self._exp_written(self._cap_start(pos))

    def _basic_written(self, pos: int, value: int) -> None:
        """vfio_basic_config_write: vconfig remembers the memory and I/O enables last written,
        INTX_DISABLE masks INTx virtually, and a BAR write makes the BARs dirty."""
        if pos == pci.PCI_COMMAND:
            bits = pci.PCI_COMMAND_MEMORY | pci.PCI_COMMAND_IO
            cmd = struct.unpack_from("<H", self.vconfig, pci.PCI_COMMAND)[0]
            struct.pack_into("<H", self.vconfig, pci.PCI_COMMAND, (cmd & ~bits) | (value & bits))
        if pos in (pci.PCI_COMMAND, pci.PCI_COMMAND + 1):
            disable = bool(struct.unpack_from("<H", self.vconfig, pci.PCI_COMMAND)[0] & pci.PCI_COMMAND_INTX_DISABLE)
            if disable and not self.virq_disabled:
                self.virq_disabled = True
                self.intx_mask()
            elif not disable and self.virq_disabled:
                self.virq_disabled = False
                self.intx_unmask_handler()
        if pci.PCI_BASE_ADDRESS_0 <= pos < pci.PCI_BASE_ADDRESS_0 + 24 or pci.PCI_ROM_ADDRESS <= pos < pci.PCI_ROM_ADDRESS + 4:
            self.bardirty = True

    def _msi_flags_written(self, pos: int) -> None:
        """vfio_msi_config_write: enable stays off outside MSI mode, the queue size is capped at
        what was allocated, and the result is what the device gets."""
        flags = struct.unpack_from("<H", self.vconfig, pos + pci.PCI_MSI_FLAGS)[0]
        if self.irq_type != MSI:
            flags &= ~pci.PCI_MSI_FLAGS_ENABLE
        if (flags & pci.PCI_MSI_FLAGS_QSIZE) >> 4 > self.msi_qmax:
            flags = (flags & ~pci.PCI_MSI_FLAGS_QSIZE) | (self.msi_qmax << 4)
        struct.pack_into("<H", self.vconfig, pos + pci.PCI_MSI_FLAGS, flags)
        self.function.config_write(pos + pci.PCI_MSI_FLAGS, 2, flags)

    def _exp_written(self, pos: int) -> None:
        """vfio_exp_config_write: the virtual FLR bit always reads 0; it resets the function when
        Device Capabilities offers FLR."""
        ctrl = struct.unpack_from("<H", self.vconfig, pos + pci.PCI_EXP_DEVCTL)[0]
        if ctrl & pci.PCI_EXP_DEVCTL_BCR_FLR:
            struct.pack_into("<H", self.vconfig, pos + pci.PCI_EXP_DEVCTL, ctrl & ~pci.PCI_EXP_DEVCTL_BCR_FLR)
            if self.function.config_read(pos + pci.PCI_EXP_DEVCAP, 4) & pci.PCI_EXP_DEVCAP_FLR:
                self._try_reset()

    def memory_enabled(self) -> bool:
        return bool(self.vconfig[pci.PCI_COMMAND] & pci.PCI_COMMAND_MEMORY)

    @property
    def flags(self) -> int:
        return uapi.VFIO_DEVICE_FLAGS_PCI | (uapi.VFIO_DEVICE_FLAGS_RESET if self.reset_works else 0)

    @property
    def num_irqs(self) -> int:
        return NUM_IRQS

    # -- regions --------------------------------------------------------------------------------
    @property
    def num_regions(self) -> int:
        return NUM_REGIONS

    def _mmap_supported(self, index: int) -> bool:
        """vfio_pci_probe_mmaps: memory BARs of a page or more; a smaller one only when it starts a
        page no other BAR shares, since Linux reserves the rest of that page for it."""
        f = self.function
        bar = f.bars[index]
        if bar is None or bar.kind == pci.BAR_IO:
            return False
        if bar.size >= PAGE_SIZE:
            return True
        start = f.bar_address(index)
        if start % PAGE_SIZE:
            return False
        rest = range(start + bar.size, start + PAGE_SIZE)
        return not any(other.bar_address(i) in rest
                       for other in self.kernel.functions.values()
                       for i, b in enumerate(other.bars) if b is not None and b.kind != pci.BAR_IO)

    def region_info(self, index: int) -> tuple[int, int, list]:
        """(flags, size, caps) of a region, or EINVAL as vfio_pci_ioctl_get_region_info answers.

        What it depends on is fixed at the first open (vfio_pci_probe_mmaps runs in
        vfio_pci_core_enable), so a BAR moved afterwards keeps the mmap support it had then."""
        info = self.regions.get(index)
        return info if info is not None else self._region_info(index)

    def _region_info(self, index: int) -> tuple[int, int, list]:
        f = self.function
        if index == CONFIG:
            return uapi.VFIO_REGION_INFO_FLAG_READ | uapi.VFIO_REGION_INFO_FLAG_WRITE, len(f.config), []
        if index < ROM:
            bar = f.bars[index]
            if bar is None:
                return 0, 0, []
            flags = uapi.VFIO_REGION_INFO_FLAG_READ | uapi.VFIO_REGION_INFO_FLAG_WRITE
            caps = []
            if self._mmap_supported(index):
                flags |= uapi.VFIO_REGION_INFO_FLAG_MMAP
                if self.msix_table and self.msix_table[0] == index:
                    caps.append(uapi.MsixMappableCap())
            return flags, bar.size, caps
        if index == ROM:
            if not f.rom:
                return 0, 0, []
            return uapi.VFIO_REGION_INFO_FLAG_READ, len(f.rom), []
        if index == VGA:
            raise error(errno.EINVAL, "not a VGA device")
        raise error(errno.EINVAL, "region index out of range")

    def rw(self, offset: int, data: bytes | None, count: int) -> bytes | int:
        """pread (data None) or pwrite at a region offset, as vfio_pci_rw dispatches it."""
        index = offset >> VFIO_PCI_OFFSET_SHIFT
        if index < ROM:
            return self._bar_rw(index, offset & VFIO_PCI_OFFSET_MASK, data, count)
        pos = offset & VFIO_PCI_OFFSET_MASK
        if index >= self.num_regions:
            raise error(errno.EINVAL, "region index out of range")
        if index == CONFIG:
            return self._config_rw(pos, data, count)
        if index == ROM and data is not None:
            raise error(errno.EINVAL, "the ROM is read-only")
        if index == VGA:
            raise error(errno.EINVAL, "not a VGA device")
        return self._bar_rw(index, pos, data, count)

    def _config_chunk(self, pos: int, count: int) -> int:
        """vfio_config_do_rw's cut: never past the capability or the dword, then 4, 2 or 1 bytes
        by alignment."""
        cap = self.cap_map[pos]
        room = 1
        while (pos + room) % 4 and self.cap_map[pos + room] == cap:
            room += 1
        count = min(count, room)
        if count >= 4 and not pos % 4:
            return 4
        if count >= 2 and not pos % 2:
            return 2
        return 1

    def _config_rw(self, pos: int, data: bytes | None, count: int):
        if pos + count > len(self.vconfig):
            raise error(errno.EFAULT, "config access beyond the config space")
        out = bytearray()
        done = 0
        while done < count:
            n = self._config_chunk(pos + done, count - done)
            if data is None:
                out += self.config_read(pos + done, n).to_bytes(n, "little")
            else:
                self.config_write(pos + done, n, int.from_bytes(data[done:done + n], "little"))
            done += n
        return bytes(out) if data is None else count

    def _bar_rw(self, index: int, pos: int, data: bytes | None, count: int):
        f = self.function
        if index == ROM:
            if not f.rom or pos >= len(f.rom):
                raise error(errno.EINVAL, "beyond the ROM")
            return bytes(f.rom[pos:pos + count])
        bar = f.bars[index]
        if bar is None or pos >= bar.size:
            raise error(errno.EINVAL, "beyond the BAR")
        if count > bar.size - pos:
            count = bar.size - pos
        if bar.kind != pci.BAR_IO and not self.memory_enabled():
            raise error(errno.EIO, "memory decode disabled")
        if bar.ram:
            if data is None:
                return os.pread(self.ram[index], count, pos)
            return os.pwrite(self.ram[index], data[:count], pos)
        x_start = x_end = 0
        if self.msix_table and self.msix_table[0] == index:
            _, x_start, x_end = self.msix_table
        if count in _ONE_ACCESS and not pos % count and (pos + count <= x_start or pos >= x_end):
            # A register access, by far the most common: one device access, nothing to split.
            if data is None:
                return f.mmio_read(index, pos, count).to_bytes(count, "little")
            f.mmio_write(index, pos, count, int.from_bytes(data, "little"))
            return count
        if pos + count <= x_start or pos >= x_end:
            spans = ((pos, pos + count),)
        else:
            spans = ((pos, min(pos + count, x_start)), (max(pos, x_start), min(pos + count, x_end)),
                     (max(pos, x_end), pos + count))
        out = bytearray()
        for start, end in spans:
            if start >= end:
                continue
            if start >= x_start and end <= x_end:
                out += b"\xff" * (end - start)
                continue
            for off, size in split_access(start, end - start, (4, 2, 1)):
                if data is None:
                    out += f.mmio_read(index, off, size).to_bytes(size, "little")
                else:
                    f.mmio_write(index, off, size, int.from_bytes(data[off - pos:off - pos + size], "little"))
        return bytes(out) if data is None else count

    def mmap(self, offset: int, length: int, prot: int):
        index = offset >> VFIO_PCI_OFFSET_SHIFT
        pos = offset & VFIO_PCI_OFFSET_MASK
        if index >= self.num_regions or index >= ROM:
            raise error(errno.EINVAL, "region cannot be mmapped")
        flags, size, _ = self.region_info(index)
        if not flags & uapi.VFIO_REGION_INFO_FLAG_MMAP:
            raise error(errno.EINVAL, "region cannot be mmapped")
        phys_len = (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        if pos % PAGE_SIZE or length <= 0 or pos + length > phys_len:
            raise error(errno.EINVAL, "mmap outside the BAR")
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
            return (f.msix_flags() & pci.PCI_MSIX_FLAGS_QSIZE) + 1 if f.msix_layout() else 0
        if index == ERR:
            return 1 if f.pcie else 0
        if index == REQ:
            return 1
        return 0

    def irq_info(self, index: int) -> tuple[int, int]:
        if index >= NUM_IRQS or (index == ERR and not self.function.pcie):
            raise error(errno.EINVAL, "irq index out of range")
        flags = uapi.VFIO_IRQ_INFO_EVENTFD
        if index == INTX:
            flags |= uapi.VFIO_IRQ_INFO_MASKABLE | uapi.VFIO_IRQ_INFO_AUTOMASKED
        elif index != MSIX or not self.has_dyn_msix:
            flags |= uapi.VFIO_IRQ_INFO_NORESIZE
        return flags, self.irq_count(index)

    def set_irqs(self, buf: bytearray) -> int:
        """VFIO_DEVICE_SET_IRQS: vfio_set_irqs_validate_and_prepare, then the per-index handler."""
        hdr = uapi.vfio_irq_set.unpack(buf)
        data_type, data = validate_and_prepare(hdr, buf, self.irq_count(hdr.index), NUM_IRQS)
        action = hdr.flags & ACTION_MASK
        handler = self._irq_handler(hdr.index, action)
        if handler is None:
            raise error(errno.ENOTTY, "no handler for that index and action")
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
            raise error(errno.EINVAL, "INTx is not enabled")
        if data_type == uapi.VFIO_IRQ_SET_DATA_EVENTFD:
            raise error(errno.ENOTTY, "masking by eventfd is not implemented")
        if wants(data_type, data):
            self.intx_mask()

    def _set_intx_unmask(self, index, start, count, data_type, data):
        if self.irq_type != INTX:
            raise error(errno.EINVAL, "INTx is not enabled")
        if data_type == uapi.VFIO_IRQ_SET_DATA_EVENTFD:
            self._set_unmask_eventfd(data[0] if count else -1)
        elif wants(data_type, data):
            self.intx_unmask_handler()

    def _set_unmask_eventfd(self, fd: int) -> None:
        virqfd_disable(self.kernel, self.intx_unmask)
        self.intx_unmask = None
        if fd >= 0:
            ctx = EventfdCtx(fd)
            self.intx_unmask = ctx
            virqfd_add(self.kernel, ctx, self.intx_unmask_handler)

    def _set_intx_trigger(self, index, start, count, data_type, data):
        if self.irq_type == INTX and not count and data_type == uapi.VFIO_IRQ_SET_DATA_NONE:
            self._intx_disable()
            return
        if self.irq_type not in (INTX, IRQ_NONE) or start != 0 or count != 1:
            raise error(errno.EINVAL, "INTx trigger needs start 0, count 1 and no other mode")
        if data_type == uapi.VFIO_IRQ_SET_DATA_EVENTFD:
            self.intx.set_trigger(data[0])
            if self.irq_type != INTX:
                self._intx_enable()
            return
        if self.irq_type != INTX:
            raise error(errno.EINVAL, "INTx is not enabled")
        if wants(data_type, data):
            self._send_intx()

    def _intx_enable(self) -> None:
        """vfio_intx_enable: the handler is requested on the device's IRQ line at enable and kept
        until disable, whatever eventfd it signals (the persistent handler of 6.1.83 and later)."""
        self.irq_type = INTX
        self.kernel.interrupts.request_irq(self.spec.interrupt_line, self._intx_name())
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
        self.kernel.interrupts.free_irq(self.spec.interrupt_line, self._intx_name())
        self.intx_masked = False
        self.irq_type = IRQ_NONE

    def _intx_name(self) -> str:
        return f"vfio-intx({self.bdf})"

    # MSI / MSI-X --------------------------------------------------------------------------------
    # msi_irqs holds the IRQ of each vector the PCI core has allocated (what pci_irq_vector
    # answers), msi_ctx each vector's trigger, None where it has none; a vector is wired while its
    # trigger is set, and only then is its handler, and so its /proc/interrupts line, requested.
    def _msi_message(self, vector: int) -> None:
        if self.irq_type in (MSI, MSIX) and vector < len(self.msi_ctx):
            self.msi_ctx[vector].signal()

    def _set_msi_trigger(self, index, start, count, data_type, data):
        if self.irq_type == index and not count and data_type == uapi.VFIO_IRQ_SET_DATA_NONE:
            self._msi_disable()
            return
        if self.irq_type not in (index, IRQ_NONE):
            raise error(errno.EINVAL, "another interrupt mode is enabled")
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
        if self.irq_type != index or (self._num_ctx_bound() and start + count > len(self.msi_irqs)):
            raise error(errno.EINVAL, "vectors not enabled")
        for i in range(start, min(start + count, len(self.msi_ctx))):
            if data_type == uapi.VFIO_IRQ_SET_DATA_NONE or data[i - start]:
                self.msi_ctx[i].signal()

    def _num_ctx_bound(self) -> bool:
        """Whether MSI/MSI-X SET_IRQS is bounded by vdev->num_ctx, as on 6.1: the vectors enabled,
        which are 0..nvec-1 there (no vector is allocated later), so len(msi_irqs) is the bound.
        Per-vector contexts (the profile's irq_ctx_xarray) have no such bound."""
        return not self.kernel.profile.irq_ctx_xarray

    def _msi_enable(self, index: int, nvec: int) -> None:
        """vfio_msi_enable: nvec vectors allocated (pci_alloc_irq_vectors), none wired yet."""
        self.msi_irqs = {vector: self._alloc_vector(index, vector) for vector in range(nvec)}
        self.msi_ctx = [IRQContext() for _ in range(nvec)]
        self.irq_type = index
        cap = self.function.msi_cap()
        if index == MSI and cap:
            self.msi_qmax = (nvec * 2 - 1).bit_length() - 1
            flags = self.function.config_read(cap.offset + 2, 2) & ~pci.PCI_MSI_FLAGS_QSIZE
            self.function.config_write(cap.offset + 2, 2, flags | pci.PCI_MSI_FLAGS_ENABLE | (self.msi_qmax << 4))
        else:
            self.function.msix_enable(True)

    def _alloc_vector(self, index: int, vector: int) -> int:
        kind = "MSIX" if index == MSIX else "MSI"
        return self.kernel.interrupts.alloc_msi(f"IR-PCI-{kind}-{self.bdf}", vector)

    def _msi_set_block(self, start: int, count: int, fds: list[int]) -> None:
        """vfio_msi_set_block: each vector in turn; after a failure, the vectors from `start` to
        the one that failed are unset again."""
        if self._num_ctx_bound() and (start >= len(self.msi_irqs) or start + count > len(self.msi_irqs)):
            raise error(errno.EINVAL, "vectors beyond those enabled")
        for j in range(count):
            try:
                self._set_vector(start + j, fds[j])
            except OSError:
                for k in range(start, start + j + 1):
                    self._set_vector(k, -1)
                raise

    def _set_vector(self, vector: int, fd: int) -> None:
        """vfio_msi_set_vector_signal: the vector's handler is freed first (for MSI-X that masks
        the table entry and zeroes its message), then with an fd requested again, which writes
        the message and unmasks, so a pending vector fires. A vector the PCI core has not
        allocated is allocated now with dynamic MSI-X, and is EINVAL otherwise."""
        msix = self.irq_type == MSIX
        name = f"vfio-msi{'x' if msix else ''}[{vector}]({self.bdf})"
        ctx = self.msi_ctx[vector] if vector < len(self.msi_ctx) else None
        if ctx and ctx.trigger:
            self.kernel.interrupts.free_irq(self.msi_irqs[vector], name)
            if msix:
                self._msix_entry(vector, None)
            ctx.set_trigger(-1)
        if fd < 0:
            return
        if vector not in self.msi_irqs:
            if not (msix and self.has_dyn_msix):
                raise error(errno.EINVAL, f"vector {vector} is not allocated")
            self.msi_irqs[vector] = self._alloc_vector(MSIX, vector)
        self.msi_ctx.extend(IRQContext() for _ in range(vector + 1 - len(self.msi_ctx)))
        self.msi_ctx[vector].set_trigger(fd)
        self.kernel.interrupts.request_irq(self.msi_irqs[vector], name)
        if msix:
            self._msix_entry(vector, MSIX_REMAPPED_MSG | (vector << 5))

    def _msix_entry(self, vector: int, address: int | None) -> None:
        f = self.function
        entry = f.msix_layout()[1] + vector * pci.PCI_MSIX_ENTRY_SIZE
        f.msix_bar_write(entry + pci.PCI_MSIX_ENTRY_VECTOR_CTRL, 4, pci.PCI_MSIX_ENTRY_CTRL_MASKBIT)
        f.msix_bar_write(entry, 8, address or 0)
        f.msix_bar_write(entry + 8, 4, 0)
        if address is not None:
            f.msix_bar_write(entry + pci.PCI_MSIX_ENTRY_VECTOR_CTRL, 4, 0)

    def _msi_disable(self) -> None:
        """vfio_msi_disable: every vector unset, then all of them freed (pci_free_irq_vectors)."""
        for vector in range(len(self.msi_ctx)):
            self._set_vector(vector, -1)
        for irq in self.msi_irqs.values():
            self.kernel.interrupts.free_msi(irq)
        cap = self.function.msi_cap()
        if self.irq_type == MSI and cap:
            flags = self.function.config_read(cap.offset + 2, 2)
            self.function.config_write(cap.offset + 2, 2, flags & ~(pci.PCI_MSI_FLAGS_ENABLE | pci.PCI_MSI_FLAGS_QSIZE))
        elif self.irq_type == MSIX:
            self.function.msix_enable(False)
        self.msi_irqs = {}
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
            raise error(errno.EINVAL, "ERR/REQ take start 0 and at most one vector")
        ctx = getattr(self, attr)
        if data_type == uapi.VFIO_IRQ_SET_DATA_NONE:
            if ctx:
                if count:
                    ctx.signal()
                else:
                    ctx.put()
                    setattr(self, attr, None)
                return
            raise error(errno.EINVAL, "no eventfd set")
        if not count:
            raise error(errno.EINVAL, "count 0 with data")
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
    def _dma_read(self, addr: int, size: int):
        iommu = self.iommu()
        return iommu.dma_read(addr, size) if iommu is not None else None

    def _dma_write(self, addr: int, data: bytes) -> bool:
        iommu = self.iommu()
        return iommu.dma_write(addr, data) if iommu is not None else False

    # reset ----------------------------------------------------------------------------------------
    def _reset_function(self) -> None:
        """__pci_reset_function_locked with the function's one reset method."""
        if self.function.reset_by_pm:
            self.function.pm_reset()
        else:
            self.function.reset()

    def _restore_header(self, saved: bytes) -> None:
        """pci_restore_config_space: header dwords that differ are written back, BARs before COMMAND."""
        f = self.function
        for index in (*range(15, 9, -1), *range(9, 3, -1), *range(3, -1, -1)):
            value = int.from_bytes(saved[4 * index:4 * index + 4], "little")
            if f.config_read(4 * index, 4) != value:
                f.config_write(4 * index, 4, value)

    def _try_reset(self) -> None:
        """pci_try_reset_function: the reset, with the header and MSI state saved around it."""
        f = self.function
        saved = bytes(f.config)
        f.config_write(pci.PCI_COMMAND, 2, pci.PCI_COMMAND_INTX_DISABLE)
        self._reset_function()
        self._restore_header(saved)
        cap = f.msi_cap()
        if cap:
            f.config[cap.offset:cap.offset + cap.size] = saved[cap.offset:cap.offset + cap.size]

    def reset(self) -> None:
        if not self.reset_works:
            raise error(errno.EINVAL, "device has no reset method")
        self._try_reset()
        self.resets += 1

    # -- the device fd's name and vfio-pci's own ioctls -------------------------------------------
    def match(self, name: str) -> bool:
        """vfio_pci_core_match: the BDF, then options (a VF token), which the fake knows none of."""
        bdf, _, options = name.partition(" ")
        if bdf != self.bdf:
            return False
        if options.strip():
            raise error(errno.EINVAL, f"unknown device options {options.strip()!r}")
        return True

    def ioctl(self, request: int, arg) -> int:
        if request == uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO:
            return self.hot_reset_info(buf_arg(arg))
        return super().ioctl(request, arg)

    def hot_reset_set(self) -> list[PciDeviceSpec] | None:
        """Functions a bus reset would hit; None on the root bus, as on q35's bus 0."""
        bus = self.bdf[:7]
        if bus.endswith(":00"):
            return None
        return [d for d in self.kernel.topology.devices if d.bdf[:7] == bus and d.group is not None]

    def hot_reset_info(self, buf: bytearray) -> int:
        layout = uapi.vfio_pci_hot_reset_info
        info = copy_from_user(layout, buf, layout.size)
        if info.argsz < layout.size:
            raise error(errno.EINVAL, "argsz below vfio_pci_hot_reset_info")
        affected = self.hot_reset_set()
        if affected is None:
            raise error(errno.ENODEV, "no slot or bus reset for this device")
        entry = uapi.vfio_pci_dependent_device
        if info.argsz < layout.size + entry.size * len(affected):
            layout.pack_into(buf, 0, argsz=info.argsz, flags=0, count=len(affected))
            raise error(errno.ENOSPC, f"{len(affected)} devices need more argsz")
        if len(buf) < layout.size + entry.size * len(affected):
            layout.pack_into(buf, 0, argsz=info.argsz, flags=0, count=len(affected))
            raise error(errno.EFAULT, "argsz claims room for the devices the buffer does not have")
        for i, spec in enumerate(affected):
            dom, bus, devfn = _split_bdf(spec.bdf)
            entry.pack_into(buf, layout.size + i * entry.size, group_id=spec.group, segment=dom, bus=bus, devfn=devfn)
        layout.pack_into(buf, 0, argsz=info.argsz, flags=0, count=len(affected))
        return 0


def _split_bdf(bdf: str) -> tuple[int, int, int]:
    dom, bus, rest = bdf.split(":")
    slot, fn = rest.split(".")
    return int(dom, 16), int(bus, 16), (int(slot, 16) << 3) | int(fn, 16)


CAP_PERMS = {pci.PCI_CAP_ID_PM: VfioPciDevice._pm_perms, pci.PCI_CAP_ID_MSI: VfioPciDevice._msi_perms,
             pci.PCI_CAP_ID_EXP: VfioPciDevice._exp_perms}
