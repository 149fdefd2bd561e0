"""An s390 I/O subchannel with a small block device behind it: what vfio-ccw passes through.

The subchannel answers the I/O instructions with the condition codes of the architecture (ssch,
hsch, csch, stsch, msch's enable and disable) and runs a started channel program itself, reading
CCWs and moving data through the container's IOMMU. When a function ends, the subchannel turns
status pending and tells its interruption sink; the driver fetches the IRB with tsch, as Linux's
cio does in its interrupt handler.

The device stores bytes. READ and WRITE move `count` bytes at a position that starts at 0 with
every channel program and advances with each transfer, so a block written by one program is read
back by the next. BASIC SENSE hands over the sense bytes, NOP does nothing, TIC jumps. Any other
command is rejected, and a transfer past the end is an equipment check: both end the program
with a unit check whose sense bytes say which.
"""

from __future__ import annotations

import collections
from typing import Callable

from vfio_impl.uapi import css
from vfio_impl.uapi.css import CCW1, IRB, ORB, PMCW, SCHIB, SCSW

CAPACITY = 64 * 1024
SENSE_CMD_REJECT = 0x80
SENSE_EQUIPMENT_CHECK = 0x10
# ERW of a format-0 ESW: concurrent sense, and the sense byte count in bits 10-15.
ERW_CONS = 0x01000000
ERW_SCNT_SHIFT = 16
# A TIC loop can chain forever; the channel gives up after this many CCWs.
MAX_CCWS = 4096
CCW_SIZE = 8
UNSUPPORTED_FLAGS = css.CCW_FLAG_DC | css.CCW_FLAG_IDA | css.CCW_FLAG_SUSPEND | css.CCW_FLAG_SKIP
# The bits an ORB and the SCSW that reports on it share.
ORB_TO_SCSW_FLAGS = (css.ORB_CTRL0_MASK_KEY | css.ORB_CTRL0_MASK_FMT | css.ORB_CTRL0_MASK_PFCH
                     | css.ORB_CTRL0_MASK_ISIC | css.ORB_CTRL0_MASK_ALCC)
ENDED = css.SCSW_STCTL_PRIMARY | css.SCSW_STCTL_SECONDARY | css.SCSW_STCTL_STATUS_PEND
DSTAT_END = css.SCSW_DSTAT_CHANNEL_END | css.SCSW_DSTAT_DEVICE_END
DSTAT_UNIT_CHECK = DSTAT_END | css.SCSW_DSTAT_UNIT_CHECK
CC_OK, CC_STATUS_PENDING, CC_BUSY, CC_NOT_OPERATIONAL = 0, 1, 2, 3


def fetch_ccw(iommu, addr: int, format1: bool) -> CCW1 | None:
    """The CCW at a guest address as format 1, whichever format the ORB named; None if the IOMMU
    refused the read."""
    raw = iommu.dma_read(addr, CCW_SIZE)
    if raw is None:
        return None
    return CCW1.unpack(raw) if format1 else css.CCW0.unpack(raw).to_ccw1()


def does_data_transfer(ccw: CCW1) -> bool:
    return ccw.cmd_code not in (css.CCW_CMD_NOOP, css.CCW_CMD_TIC) and ccw.count > 0


class CcwBlock:
    """The device: a byte store, a position within the running channel program, sense bytes."""

    model = "ccw-block"

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.store = bytearray(capacity)
        self.sense = bytearray(css.SENSE_DATA_SIZE)
        self.pos = 0

    def begin(self) -> None:
        self.pos = 0

    def read(self, count: int) -> bytes | None:
        if not self._fits(count):
            return None
        data = bytes(self.store[self.pos:self.pos + count])
        self.pos += count
        return data

    def write(self, data: bytes) -> bool:
        if not self._fits(len(data)):
            return False
        self.store[self.pos:self.pos + len(data)] = data
        self.pos += len(data)
        return True

    def _fits(self, count: int) -> bool:
        if self.pos + count <= len(self.store):
            return True
        self.sense[0] = SENSE_EQUIPMENT_CHECK
        return False

    def reject(self) -> None:
        self.sense[0] = SENSE_CMD_REJECT

    def take_sense(self) -> bytes:
        """Basic sense hands the bytes over and clears them."""
        sense = bytes(self.sense)
        self.sense[:] = bytes(len(self.sense))
        return sense



class _ProgramEnd(Exception):
    """How the channel program ended, as the SCSW will say it: raised where it ends early,
    returned where the last CCW ends it."""

    def __init__(self, addr: int, dstat: int = 0, cstat: int = 0, residual: int = 0):
        self.addr, self.dstat, self.cstat, self.residual = addr, dstat, cstat, residual


class Subchannel:
    """One I/O subchannel: its SCHIB, status pending in IRBs, the device behind it.

    `hold` keeps a started program start-pending until `finish()`, so a test can catch the
    subchannel busy; `operational` False makes every instruction answer condition code 3.
    """

    def __init__(self, devno: int, chpids: tuple[int, ...], device: CcwBlock, pim: int):
        pmcw = PMCW(devno=devno, flags=css.PMCW_FLAGS_MASK_DNV, lpm=pim, pim=pim, pam=pim, pom=0xFF,
                    chpid=bytes(chpids) + bytes(8 - len(chpids)), chars=css.PMCW_CHARS_MASK_CSENSE)
        self.schib = SCHIB(pmcw)
        self.device = device
        self.operational = True
        self.hold = False
        self.status: collections.deque[IRB] = collections.deque()
        self.started: tuple[ORB, object] | None = None
        self.irq_sink: Callable[[], None] = lambda: None
        self.programs = 0

    @property
    def enabled(self) -> bool:
        return bool(self.schib.pmcw.flags & css.PMCW_FLAGS_MASK_ENA)

    def _cc(self) -> int | None:
        """The condition code every instruction checks first, None when it may go on."""
        if not self.operational:
            return CC_NOT_OPERATIONAL
        if self.status:
            return CC_STATUS_PENDING
        return None

    # -- msch: enable and disable ---------------------------------------------------------------
    def enable(self, isc: int, intparm: int) -> int:
        if not self.operational:
            return CC_NOT_OPERATIONAL
        pmcw = self.schib.pmcw
        pmcw.flags = pmcw.flags & ~css.PMCW_FLAGS_MASK_ISC | isc << 11 | css.PMCW_FLAGS_MASK_ENA
        pmcw.intparm = intparm
        return CC_OK

    def disable(self) -> int:
        if not self.operational:
            return CC_NOT_OPERATIONAL
        if self.started is not None or self.status:
            return CC_BUSY
        self.schib.pmcw.flags &= ~css.PMCW_FLAGS_MASK_ENA
        return CC_OK

    # -- ssch, hsch, csch, stsch, tsch ----------------------------------------------------------
    def ssch(self, orb: ORB, iommu) -> int:
        """Start: cc 3 when no path the ORB allows is available, else the program runs (or waits
        for finish() while `hold` is set)."""
        cc = self._cc()
        if cc is not None:
            return cc
        if not self.enabled:
            return CC_NOT_OPERATIONAL
        if self.started is not None:
            return CC_BUSY
        pmcw = self.schib.pmcw
        if not (orb.lpm or pmcw.pim) & pmcw.pam & pmcw.pom:
            return CC_NOT_OPERATIONAL
        self.schib.scsw = SCSW(flags=orb.ctrl0 & ORB_TO_SCSW_FLAGS,
                               ctrl=css.SCSW_FCTL_START_FUNC | css.SCSW_ACTL_START_PEND)
        self.started = (orb, iommu)
        if not self.hold:
            self.finish()
        return CC_OK

    def finish(self) -> None:
        """The channel runs the started program to its end and the subchannel interrupts."""
        orb, iommu = self.started
        self.started = None
        pmcw = self.schib.pmcw
        paths = (orb.lpm or pmcw.pim) & pmcw.pam & pmcw.pom
        pmcw.lpum = 0x80 >> (8 - paths.bit_length())
        self.programs += 1
        self._interrupt(self._run(orb, iommu))

    def hsch(self) -> int:
        """Halt: a start still pending is ended with it; the halt function reports alone otherwise."""
        cc = self._cc()
        if cc is not None:
            return cc
        ctrl = css.SCSW_FCTL_HALT_FUNC | css.SCSW_STCTL_STATUS_PEND
        scsw = SCSW(ctrl=ctrl)
        if self.started is not None:
            orb = self.started[0]
            self.started = None
            scsw = SCSW(flags=orb.ctrl0 & ORB_TO_SCSW_FLAGS, ctrl=ctrl | css.SCSW_FCTL_START_FUNC, cpa=orb.cpa)
        self._interrupt(IRB(scsw))
        return CC_OK

    def csch(self) -> int:
        """Clear: whatever runs is dropped, pending status too; only cc 3 can refuse it."""
        if not self.operational:
            return CC_NOT_OPERATIONAL
        self.started = None
        self.status.clear()
        self._interrupt(IRB(SCSW(ctrl=css.SCSW_FCTL_CLEAR_FUNC | css.SCSW_STCTL_STATUS_PEND)))
        return CC_OK

    def stsch(self) -> tuple[int, SCHIB]:
        if not self.operational:
            return CC_NOT_OPERATIONAL, SCHIB()
        return CC_OK, SCHIB.unpack(self.schib.pack())

    def tsch(self) -> IRB | None:
        """The oldest pending status; the subchannel is idle again once it is taken."""
        if not self.status:
            return None
        irb = self.status.popleft()
        if not self.status and self.started is None:
            self.schib.scsw = SCSW()
        return irb

    def _interrupt(self, irb: IRB) -> None:
        self.schib.scsw = SCSW.unpack(irb.scsw.pack())
        self.status.append(irb)
        self.irq_sink()

    # -- the channel program --------------------------------------------------------------------
    def _run(self, orb: ORB, iommu) -> IRB:
        flags = orb.ctrl0 & ORB_TO_SCSW_FLAGS
        self.device.begin()
        try:
            end = self._interpret(orb, iommu)
        except _ProgramEnd as early:
            end = early
        ctrl = css.SCSW_FCTL_START_FUNC | ENDED | (css.SCSW_STCTL_ALERT if end.cstat or end.dstat != DSTAT_END else 0)
        if end.dstat != DSTAT_UNIT_CHECK or not self.schib.pmcw.chars & css.PMCW_CHARS_MASK_CSENSE:
            return IRB(SCSW(flags, ctrl, end.addr + CCW_SIZE, end.dstat, end.cstat, end.residual))
        # Concurrent sense: the sense bytes come with the unit check, in the ECW, and the device
        # has none left for a BASIC SENSE.
        flags |= css.SCSW_FLAGS_MASK_ESWF | css.SCSW_FLAGS_MASK_ECTL
        return IRB(SCSW(flags, ctrl, end.addr + CCW_SIZE, end.dstat, end.cstat, end.residual),
                   esw=(0, ERW_CONS | css.SENSE_DATA_SIZE << ERW_SCNT_SHIFT, 0, 0, 0),
                   ecw=self.device.take_sense())

    def _interpret(self, orb: ORB, iommu) -> _ProgramEnd:
        """Run CCW after CCW until one without command chaining ends the program."""
        format1 = bool(orb.ctrl0 & css.ORB_CTRL0_MASK_FMT)
        addr, after_tic = orb.cpa, False
        for _ in range(MAX_CCWS):
            ccw = fetch_ccw(iommu, addr, format1)
            if ccw is None or ccw.flags & UNSUPPORTED_FLAGS or orb.ctrl1 & css.ORB_CTRL1_MASK_MIDAW:
                raise _ProgramEnd(addr, cstat=css.SCSW_CSTAT_PROG_CHECK)
            if ccw.cmd_code == css.CCW_CMD_TIC:
                if after_tic:
                    raise _ProgramEnd(addr, cstat=css.SCSW_CSTAT_PROG_CHECK)
                addr, after_tic = ccw.cda, True
                continue
            after_tic = False
            residual = self._command(ccw, addr, iommu)
            if not ccw.flags & css.CCW_FLAG_CC:
                return _ProgramEnd(addr, DSTAT_END, residual=residual)
            addr += CCW_SIZE
        raise _ProgramEnd(addr, cstat=css.SCSW_CSTAT_PROG_CHECK)

    def _command(self, ccw: CCW1, addr: int, iommu) -> int:
        """One command; returns its residual count."""
        device = self.device
        if ccw.cmd_code == css.CCW_CMD_NOOP:
            return 0
        if ccw.cmd_code == css.CCW_CMD_WRITE:
            data = iommu.dma_read(ccw.cda, ccw.count)
            if data is None:
                raise _ProgramEnd(addr, cstat=css.SCSW_CSTAT_DATA_CHECK)
            if not device.write(data):
                raise _ProgramEnd(addr, DSTAT_UNIT_CHECK, residual=ccw.count)
            return 0
        if ccw.cmd_code == css.CCW_CMD_READ:
            data = device.read(ccw.count)
            if data is None:
                raise _ProgramEnd(addr, DSTAT_UNIT_CHECK, residual=ccw.count)
        elif ccw.cmd_code == css.CCW_CMD_BASIC_SENSE:
            data = device.take_sense()[:ccw.count]
        else:
            device.reject()
            raise _ProgramEnd(addr, DSTAT_UNIT_CHECK, residual=ccw.count)
        if not iommu.dma_write(ccw.cda, data):
            raise _ProgramEnd(addr, cstat=css.SCSW_CSTAT_DATA_CHECK)
        return ccw.count - len(data)
