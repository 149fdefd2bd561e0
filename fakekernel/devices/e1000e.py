"""QEMU 7.2's e1000e (hw/net/e1000e.c, e1000e_core.c), the Intel 82574L, as far as a VFIO driver
test reaches: its config space and capabilities, the interrupt registers with MSI-X routing
through IVAR, and the I/O BAR's indirect window onto the registers.

There is no network peer, PHY, EEPROM or descriptor ring: registers outside the identification
and interrupt set read 0 and drop writes. QEMU throttles interrupts with ITR/EITR timers, which
can send an MSI again while its cause is still pending; here every interrupt goes out at once.
"""

from __future__ import annotations

from ..pci import (BAR_IO, PCI_PM_CAP_DSI, PCI_PM_CTRL_DATA_SEL_MASK, PCI_PM_CTRL_PME_ENABLE,
                   PCI_PM_CTRL_STATE_MASK, Bar, PciFunction, adjusted_read, adjusted_write)

MMIO_BAR, FLASH_BAR, IO_BAR, MSIX_BAR = 0, 1, 2, 3
MMIO_SIZE = FLASH_SIZE = 128 * 1024
IO_SIZE = 32
MSIX_SIZE = 16 * 1024
MSIX_TABLE, MSIX_PBA = 0x0000, 0x2000
MSIX_VEC_NUM = 5
MAC = bytes.fromhex("525400123456")  # QEMU's first default NIC address

# Registers (e1000_regs.h offsets).
CTRL, STATUS, CTRL_EXT = 0x00000, 0x00008, 0x00018
ICR, ITR, ICS, IMS, IMC, EIAC, IAM, IVAR = 0x000C0, 0x000C4, 0x000C8, 0x000D0, 0x000D8, 0x000DC, 0x000E0, 0x000E4
EITR = 0x000E8
PBA, IAC, RAL0, RAH0 = 0x01000, 0x04100, 0x05400, 0x05404
IOADDR, IODATA = 0x00, 0x04
IO_REG_LIMIT = 0x1FFFF

CTRL_FD, CTRL_GIO_MASTER_DISABLE, CTRL_SLU = 0x00000001, 0x00000004, 0x00000040
CTRL_SPD_SEL, CTRL_SPD_10, CTRL_SPD_100, CTRL_SPD_1000 = 0x00000300, 0x00000000, 0x00000100, 0x00000200
CTRL_FRCSPD, CTRL_FRCDPX = 0x00000800, 0x00001000
CTRL_SWDPIN0, CTRL_ADVD3WUC = 0x00040000, 0x00100000
CTRL_RST, CTRL_PHY_RST = 0x04000000, 0x80000000
STATUS_FD, STATUS_LU, STATUS_ASDV_1000 = 0x00000001, 0x00000002, 0x00000200
STATUS_SPEED_10, STATUS_SPEED_100, STATUS_SPEED_1000 = 0x00000000, 0x00000040, 0x00000080
STATUS_PHYRA, STATUS_GIO_MASTER_ENABLE = 0x00000400, 0x00080000
CTRL_EXT_ASDCHK, CTRL_EXT_EE_RST, CTRL_EXT_SPD_BYPS = 0x00001000, 0x00002000, 0x00008000
CTRL_EXT_EIAME, CTRL_EXT_IAME = 0x01000000, 0x08000000
RAH_AV = 0x80000000

ICR_LSC, ICR_RXO, ICR_MDAC = 0x00000004, 0x00000040, 0x00000200
ICR_SRPD, ICR_ACK, ICR_MNG = 0x00010000, 0x00020000, 0x00040000
ICR_RXQ0, ICR_RXQ1, ICR_TXQ0, ICR_TXQ1, ICR_OTHER = 0x00100000, 0x00200000, 0x00400000, 0x00800000, 0x01000000
ICR_ASSERTED = 0x80000000
ICR_OTHER_CAUSES = ICR_LSC | ICR_RXO | ICR_MDAC | ICR_SRPD | ICR_ACK | ICR_MNG
IMS_VALID = 0x000782D7 | ICR_RXQ0 | ICR_RXQ1 | ICR_TXQ0 | ICR_TXQ1 | ICR_OTHER
IVAR_ENTRY_VALID, IVAR_ENTRY_VEC = 0x8, 0x7
# MSI-X sends only these causes, each on the vector its IVAR field names; every other cause
# reaches MSI-X as ICR.OTHER, which is why IMS must enable OTHER for them.
IVAR_SHIFTS = ((ICR_RXQ0, 0), (ICR_RXQ1, 4), (ICR_TXQ0, 8), (ICR_TXQ1, 12), (ICR_OTHER, 16))

POWER_ON = {CTRL: CTRL_FD | CTRL_SWDPIN0 | CTRL_SPD_1000 | CTRL_SLU | CTRL_ADVD3WUC,
            STATUS: STATUS_ASDV_1000 | STATUS_LU, PBA: 0x00140014,
            RAL0: int.from_bytes(MAC[:4], "little"), RAH0: int.from_bytes(MAC[4:], "little") | RAH_AV}
PLAIN = (CTRL_EXT, EIAC, IAM, IVAR, PBA, RAL0, RAH0)


def _dsn(mac: bytes) -> int:
    """e1000e_gen_dsn: the MAC with ff ff spliced into the middle."""
    return int.from_bytes(mac[:3] + b"\xff\xff" + mac[3:], "big")


class E1000e(PciFunction):
    vendor_id = 0x8086
    device_id = 0x10D3
    class_code = 0x020000
    subsystem_vendor_id = 0x8086
    subsystem_id = 0x0000
    interrupt_pin = 1
    pcie = True
    model = "e1000e"
    # Linux resets it through PM (it has no FLR), which QEMU 7.2 does not act on.
    reset_works = True
    reset_by_pm = True

    def __init__(self) -> None:
        super().__init__()
        self.add_bar(MMIO_BAR, Bar(MMIO_SIZE))
        self.add_bar(FLASH_BAR, Bar(FLASH_SIZE))
        self.add_bar(IO_BAR, Bar(IO_SIZE, kind=BAR_IO))
        self.add_bar(MSIX_BAR, Bar(MSIX_SIZE))
        # Added in the order the chain runs on the real device: PM, MSI, PCIe, MSI-X.
        self.add_pm(0xC8, PCI_PM_CAP_DSI, PCI_PM_CTRL_STATE_MASK | PCI_PM_CTRL_PME_ENABLE | PCI_PM_CTRL_DATA_SEL_MASK)
        self.add_msi(0xD0, vectors_log2=0, is_64bit=True, maskbit=False)
        self.add_pcie_v1(0xE0)
        self.add_msix(0xA0, MSIX_VEC_NUM, MSIX_BAR, MSIX_TABLE, MSIX_PBA)
        self.add_aer(0x100)
        self.add_dsn(0x140, _dsn(MAC))
        self.regs = {reg: 0 for reg in (CTRL, STATUS, CTRL_EXT, ICR, ICS, IMS, IAC, *PLAIN)} | POWER_ON
        self.itr = 0
        self.eitr = [0] * MSIX_VEC_NUM
        self.msi_causes_pending = 0
        self.ioaddr = 0

    # -- registers ------------------------------------------------------------------------------
    def _status(self) -> int:
        """e1000e_get_status: link, duplex and speed follow CTRL."""
        m = self.regs
        res = m[STATUS]
        if not m[CTRL] & CTRL_GIO_MASTER_DISABLE:
            res |= STATUS_GIO_MASTER_ENABLE
        if not m[CTRL] & CTRL_FRCDPX or m[CTRL] & CTRL_FD:
            res |= STATUS_FD
        if m[CTRL] & CTRL_FRCSPD or m[CTRL_EXT] & CTRL_EXT_SPD_BYPS:
            res |= {CTRL_SPD_10: STATUS_SPEED_10, CTRL_SPD_100: STATUS_SPEED_100}.get(
                m[CTRL] & CTRL_SPD_SEL, STATUS_SPEED_1000)
        else:
            res |= STATUS_SPEED_1000
        return res

    def core_read(self, addr: int) -> int:
        reg = addr & 0x1FFFC
        m = self.regs
        if reg == ICR:
            return self._icr_read()
        if reg == STATUS:
            return self._status()
        if reg == ITR:
            return self.itr
        if EITR <= reg < EITR + 4 * MSIX_VEC_NUM:
            return self.eitr[(reg - EITR) // 4]
        if reg == IAC:
            value, m[IAC] = m[IAC], 0
            return value
        return m[reg] if reg in (CTRL, ICS, IMS, *PLAIN) else 0

    def core_write(self, addr: int, value: int) -> None:
        reg = addr & 0x1FFFC
        m = self.regs
        if reg == CTRL:
            m[CTRL] = value & ~CTRL_RST
            if value & CTRL_PHY_RST:
                m[STATUS] |= STATUS_PHYRA
        elif reg == STATUS:
            if not value & STATUS_PHYRA:
                m[STATUS] &= ~STATUS_PHYRA
        elif reg == CTRL_EXT:
            m[CTRL_EXT] = value & ~(CTRL_EXT_ASDCHK | CTRL_EXT_EE_RST)
        elif reg == ICS:
            self.set_interrupt_cause(value)
        elif reg == ICR:
            self._icr_write(value)
        elif reg == IMS:
            m[IMS] |= value & IMS_VALID
            self.update_interrupt_state()
        elif reg == IMC:
            m[IMS] &= ~value
            self.update_interrupt_state()
        elif reg == ITR:
            self.itr = value & 0xFFFF
        elif EITR <= reg < EITR + 4 * MSIX_VEC_NUM:
            self.eitr[(reg - EITR) // 4] = value & 0xFFFF
        elif reg in PLAIN:
            m[reg] = value

    def _icr_read(self) -> int:
        """Reading ICR clears it unless MSI-X is on, where only a zero IMS or IAME does; IAME
        also masks the causes IAM names."""
        m = self.regs
        value = m[ICR]
        if not m[IMS] or not self.msix_enabled():
            m[ICR] = 0
        if m[ICR] & ICR_ASSERTED and m[CTRL_EXT] & CTRL_EXT_IAME:
            m[ICR] = 0
            m[IMS] &= ~m[IAM]
        self.update_interrupt_state()
        return value

    def _icr_write(self, value: int) -> None:
        """Write 1 to clear; clearing OTHER clears the causes it stands for."""
        m = self.regs
        if m[ICR] & ICR_ASSERTED and m[CTRL_EXT] & CTRL_EXT_IAME:
            m[IMS] &= ~m[IAM]
        icr = m[ICR] & ~value
        m[ICR] = icr & ~ICR_OTHER_CAUSES if value & ICR_OTHER else icr
        self.update_interrupt_state()

    # -- interrupts -----------------------------------------------------------------------------
    def set_interrupt_cause(self, causes: int) -> None:
        self.regs[ICR] |= causes
        self.update_interrupt_state()

    def update_interrupt_state(self) -> None:
        """ICR and IMS decide: MSI-X and MSI send once per newly pending cause, INTx follows the level."""
        m = self.regs
        msix = self.msix_enabled()
        if msix and m[ICR] & ICR_OTHER_CAUSES:
            m[ICR] |= ICR_OTHER
        m[ICR] = (m[ICR] | ICR_ASSERTED) if m[ICR] & ~ICR_ASSERTED else 0
        m[ICS] = m[ICR]
        pending = m[IMS] & m[ICR]
        if not pending:
            self.msi_causes_pending = 0
        if msix or self.msi_enabled():
            if pending:
                self._send_msi(msix)
        elif pending:
            m[IAC] = min(m[IAC] + 1, 0xFFFFFFFF)
            self.set_irq(True)
        else:
            self.set_irq(False)

    def _send_msi(self, msix: bool) -> None:
        causes = self.regs[ICR] & self.regs[IMS] & ~ICR_ASSERTED
        self.msi_causes_pending &= causes
        causes ^= self.msi_causes_pending
        if not causes:
            return
        self.msi_causes_pending |= causes
        if not msix:
            self.msi_notify(0)
            return
        for cause, shift in IVAR_SHIFTS:
            if causes & cause:
                self._msix_notify_one(cause, self.regs[IVAR] >> shift)

    def _msix_notify_one(self, cause: int, entry: int) -> None:
        """Send on the IVAR vector, then the auto-clear (EIAC) and auto-mask (EIAME) of the cause."""
        m = self.regs
        if entry & IVAR_ENTRY_VALID and entry & IVAR_ENTRY_VEC < MSIX_VEC_NUM:
            self.msix_notify(entry & IVAR_ENTRY_VEC)
        if m[CTRL_EXT] & CTRL_EXT_EIAME:
            m[IAM] &= ~cause
        cleared = m[EIAC] & cause
        m[ICR] &= ~cleared
        self.msi_causes_pending &= ~cleared
        if not m[CTRL_EXT] & CTRL_EXT_IAME:
            m[IMS] &= ~cleared

    # -- BARs -----------------------------------------------------------------------------------
    def _io_read(self, addr: int) -> int:
        if addr == IOADDR:
            return self.ioaddr
        if addr == IODATA and self.ioaddr < IO_REG_LIMIT:
            return self.core_read(self.ioaddr)
        return 0

    def _io_write(self, addr: int, value: int) -> None:
        if addr == IOADDR:
            self.ioaddr = value
        elif addr == IODATA and self.ioaddr < IO_REG_LIMIT:
            self.core_write(self.ioaddr, value)

    def mmio_read(self, bar: int, offset: int, size: int) -> int:
        """The flash BAR is an empty region in QEMU: it reads 0."""
        if bar == MMIO_BAR:
            return adjusted_read(self.core_read, offset, size)
        if bar == IO_BAR:
            return adjusted_read(self._io_read, offset, size)
        if bar == MSIX_BAR:
            return self.msix_bar_read(offset, size)
        return 0

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar == MMIO_BAR:
            adjusted_write(self.core_write, offset, size, value)
        elif bar == IO_BAR:
            adjusted_write(self._io_write, offset, size, value)
        elif bar == MSIX_BAR:
            self.msix_bar_write(offset, size, value)
