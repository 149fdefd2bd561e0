"""An s390 I/O subchannel as QEMU's channel subsystem runs a virtual one (hw/s390x/css.c): the
hardware under vfio-ccw on the s390x CI guest, whatever device sits behind it.

The subchannel answers the I/O instructions with the condition codes of css_do_ssch, hsch, csch
and msch, and runs a started channel program itself, CCW after CCW as css_interpret_ccw does:
NOOP, BASIC SENSE, SENSE ID and TIC here, every other command by the device's own callback
(QEMU's ccw_cb), which answers as QEMU's do: 0, -ENOSYS for a command reject, any other negative
for a program check, -EIO when it set the status itself. The program reads its CCWs and moves its
data through a `memory` the driver hands to start subchannel: the channel program it translated.

A function's end is the SCHIB's SCSW with status pending, and the driver is told; test
subchannel then builds the IRB (build_irb_virtual) and clears what css_do_tsch_update_subch
clears, leaving the SCSW's address, count, flags and device status behind for the next store
subchannel, as QEMU does. `hold` keeps a start pending until finish(), which no QEMU subchannel
does: it is how a test catches the subchannel busy. `operational` False answers cc 3 to all.
"""

from __future__ import annotations

import errno
from typing import Callable, Protocol

from vfio_impl.uapi import css
from vfio_impl.uapi.css import CCW1, IRB, ORB, PMCW, SCHIB, SCSW, SenseID

CC_OK, CC_STATUS_PENDING, CC_BUSY, CC_NOT_OPERATIONAL = 0, 1, 2, 3
CCW_SIZE = 8
# QEMU interprets a TIC loop for as long as it loops; the fake's channel gives up after this many.
MAX_CCWS = 4096
# css_interpret_ccw refuses the 256th CCW in a row with no data address.
MAX_NO_DATA_CCWS = 255
SENSE_CMD_REJECT = 0x80
ENDED = css.SCSW_STCTL_PRIMARY | css.SCSW_STCTL_SECONDARY | css.SCSW_STCTL_STATUS_PEND
ENDED_WITH_ALERT = ENDED | css.SCSW_STCTL_ALERT
FUNCTIONS = css.SCSW_FCTL_START_FUNC | css.SCSW_FCTL_HALT_FUNC | css.SCSW_FCTL_CLEAR_FUNC
# build_irb_virtual's ESW word 0: the last path used (0x80) in the subchannel logout.
ESW_LPUM = 0x00800000
ESW_CHECKS = 0x04804000
_CHECKS = css.SCSW_CSTAT_DATA_CHECK | css.SCSW_CSTAT_CHN_CTRL_CHK | css.SCSW_CSTAT_INTF_CTRL_CHK
_PENDING_ACTL = (css.SCSW_ACTL_RESUME_PEND | css.SCSW_ACTL_START_PEND | css.SCSW_ACTL_HALT_PEND
                 | css.SCSW_ACTL_CLEAR_PEND | css.SCSW_ACTL_SUSP)
_USABLE = css.PMCW_FLAGS_MASK_DNV | css.PMCW_FLAGS_MASK_ENA


class DataStream:
    """QEMU's CcwDataStream over the guest memory one CCW addresses: `segments`, the
    (IOVA, length) pieces the driver pinned for it, read and written in order through the IOMMU.
    Going past the CCW's count, or a piece the IOMMU refuses, breaks the stream: -EINVAL, which
    the channel reports as a program check. The skip flag of a read or sense command moves the
    stream without storing anything."""

    def __init__(self, iommu, segments: list[tuple[int, int]], ccw: CCW1):
        self.iommu = iommu
        self.segments = segments
        self.count = ccw.count
        reads = ccw.cmd_code & 0x0F in (css.CCW_CMD_BASIC_SENSE, 0x0C) or ccw.cmd_code & 0x03 == 0x02
        self.skip = bool(ccw.flags & css.CCW_FLAG_SKIP) and reads
        self.at = 0
        self.broken = False

    @property
    def residual(self) -> int:
        return self.count - self.at

    def rewind(self) -> None:
        self.at = 0

    def _pieces(self, n: int) -> list[tuple[int, int]] | None:
        """The IOVA pieces of the next n bytes; None, and the stream broken, past its end."""
        pieces, skip, left = [], self.at, n
        for iova, length in self.segments:
            if not left:
                break
            if skip >= length:
                skip -= length
                continue
            take = min(length - skip, left)
            pieces.append((iova + skip, take))
            skip, left = 0, left - take
        if self.broken or left or self.at + n > self.count:
            self.broken = True
            return None
        return pieces

    def advance(self, n: int) -> int:
        if self._pieces(n) is None:
            return -errno.EINVAL
        self.at += n
        return 0

    def write(self, data: bytes) -> int:
        pieces = self._pieces(len(data))
        if pieces is None:
            return -errno.EINVAL
        done = 0
        for iova, length in pieces:
            if not self.skip and not self.iommu.dma_write(iova, data[done:done + length]):
                self.broken = True
                return -errno.EINVAL
            done += length
        self.at += done
        return 0

    def read(self, n: int) -> bytes | None:
        pieces = self._pieces(n)
        if pieces is None:
            return None
        parts = [self.iommu.dma_read(iova, length) for iova, length in pieces]
        if None in parts:
            self.broken = True
            return None
        self.at += n
        return b"".join(parts)


class ChannelMemory(Protocol):
    """What a started program runs on: the CCW at a channel address, and the data stream of it."""

    def fetch(self, addr: int) -> CCW1 | None: ...
    def stream(self, addr: int, ccw: CCW1) -> DataStream: ...


class CcwDevice(Protocol):
    """The device behind a subchannel: what SENSE ID says of it, its own commands (QEMU's
    ccw_cb), and what it does when its subchannel is disabled (QEMU's disable_cb)."""

    model: str
    sense_id: SenseID

    def ccw_cb(self, sch: "Subchannel", ccw: CCW1, stream: DataStream) -> int: ...
    def disabled(self) -> None: ...


class Subchannel:
    """One I/O subchannel: its SCHIB, its sense data, the program it runs, the device behind it."""

    def __init__(self, devno: int, chpids: tuple[int, ...], device: CcwDevice, pim: int):
        """As the subchannel is when vfio_ccw binds it: reset by the machine (css_reset_sch: the
        logical path mask is the installed one) and enabled once with concurrent sense by
        io_subchannel, whose configuration vfio_ccw's enable reuses."""
        pmcw = PMCW(devno=devno, flags=css.PMCW_FLAGS_MASK_DNV, lpm=pim, pim=pim, pam=pim, pom=0xFF,
                    chpid=bytes(chpids) + bytes(8 - len(chpids)), chars=css.PMCW_CHARS_MASK_CSENSE)
        self.schib = SCHIB(pmcw)
        self.device = device
        self.sense_data = bytearray(css.SENSE_DATA_SIZE)
        self.operational = True
        self.hold = False
        self.started: tuple[ORB, ChannelMemory] | None = None
        self.channel_prog = 0
        self.last_cmd: CCW1 | None = None
        self.irq_sink: Callable[[], None] = lambda: None
        self.programs = 0

    @property
    def scsw(self) -> SCSW:
        return self.schib.scsw

    @property
    def enabled(self) -> bool:
        return bool(self.schib.pmcw.flags & css.PMCW_FLAGS_MASK_ENA)

    def _not_usable(self) -> bool:
        return not self.operational or bool(~self.schib.pmcw.flags & _USABLE)

    # -- msch: enable and disable ---------------------------------------------------------------
    def _msch(self) -> int | None:
        """css_do_msch's refusals: None when the modification may go ahead."""
        if not self.operational:
            return CC_NOT_OPERATIONAL
        if self.scsw.ctrl & css.SCSW_STCTL_STATUS_PEND:
            return CC_STATUS_PENDING
        if self.scsw.ctrl & FUNCTIONS:
            return CC_BUSY
        return None

    def enable(self, isc: int, intparm: int) -> int:
        cc = self._msch()
        if cc is None:
            pmcw = self.schib.pmcw
            pmcw.flags = pmcw.flags & ~css.PMCW_FLAGS_MASK_ISC | isc << 11 | css.PMCW_FLAGS_MASK_ENA
            pmcw.intparm = intparm
        return cc or CC_OK

    def disable(self) -> int:
        """A subchannel that leaves the enabled state tells its device (virtio-ccw forgets the
        revision the driver negotiated)."""
        cc = self._msch()
        if cc is None:
            if self.enabled:
                self.device.disabled()
            self.schib.pmcw.flags &= ~css.PMCW_FLAGS_MASK_ENA
        return cc or CC_OK

    # -- ssch, hsch, csch, stsch, tsch ----------------------------------------------------------
    def ssch(self, orb: ORB, memory: ChannelMemory) -> int:
        """css_do_ssch; no path the ORB allows being available is cc 3 before anything starts."""
        if self._not_usable():
            return CC_NOT_OPERATIONAL
        if self.scsw.ctrl & css.SCSW_STCTL_STATUS_PEND:
            return CC_STATUS_PENDING
        if self.scsw.ctrl & FUNCTIONS:
            return CC_BUSY
        pmcw = self.schib.pmcw
        if not (orb.lpm or pmcw.pim) & pmcw.pam & pmcw.pom:
            return CC_NOT_OPERATIONAL
        self.channel_prog = orb.cpa
        self.scsw.ctrl |= css.SCSW_FCTL_START_FUNC | css.SCSW_ACTL_START_PEND
        self.scsw.flags &= ~css.SCSW_FLAGS_MASK_PNO
        self.started = (orb, memory)
        if not self.hold:
            self.finish()
        return CC_OK

    def finish(self) -> None:
        """sch_handle_start_func_virtual: the started program runs to its end, then the interrupt."""
        orb, memory = self.started
        self.started = None
        self.programs += 1
        scsw = self.scsw
        scsw.cstat = scsw.dstat = 0
        self.schib.pmcw.intparm = orb.intparm
        pmcw = self.schib.pmcw
        if not orb.lpm & pmcw.pam & pmcw.pom:
            # A deferred condition code 3: no path the ORB names can be used.
            scsw.flags |= css.SCSW_FLAGS_MASK_CC
            scsw.ctrl = scsw.ctrl & ~css.SCSW_CTRL_MASK_STCTL | css.SCSW_STCTL_ALERT | css.SCSW_STCTL_STATUS_PEND
        else:
            if orb.ctrl0 & css.ORB_CTRL0_MASK_FMT:
                scsw.flags |= css.SCSW_FLAGS_MASK_FMT
            self._end(self._run(memory))
        self.irq_sink()

    def _run(self, memory: ChannelMemory) -> int:
        self.last_cmd, no_data = None, 0
        for _ in range(MAX_CCWS):
            ret, no_data = self._interpret(memory, no_data)
            if ret != -errno.EAGAIN:
                return ret
        return -errno.EINVAL

    def _end(self, ret: int) -> None:
        """How the program ended, into the SCSW."""
        scsw = self.scsw
        if ret == -errno.EIO:
            return
        scsw.ctrl &= ~(css.SCSW_ACTL_START_PEND | css.SCSW_CTRL_MASK_STCTL)
        if ret == 0:
            scsw.ctrl |= ENDED
            scsw.dstat = css.SCSW_DSTAT_CHANNEL_END | css.SCSW_DSTAT_DEVICE_END
        elif ret == -errno.ENOSYS:
            self.sense_data[0] = SENSE_CMD_REJECT
            scsw.ctrl |= ENDED_WITH_ALERT
            scsw.dstat = css.SCSW_DSTAT_UNIT_CHECK
        else:
            scsw.ctrl |= ENDED_WITH_ALERT
            scsw.cstat = css.SCSW_CSTAT_PROG_CHECK
        scsw.cpa = (self.channel_prog + CCW_SIZE) & 0xFFFFFFFF

    def unit_check(self, sense: int) -> int:
        """A device's own unit check with one sense byte set, as its callback ends the program
        (its -EIO return, after which the status is the device's)."""
        self._end(-errno.ENOSYS)
        self.sense_data[0] = sense
        return -errno.EIO

    def _interpret(self, memory: ChannelMemory, no_data: int) -> tuple[int, int]:
        """css_interpret_ccw: one CCW; -EAGAIN to go on with the next."""
        addr = self.channel_prog
        if not addr or addr & 0x80000007:
            return -errno.EINVAL, no_data
        ccw = memory.fetch(addr)
        if ccw is None or not ccw.cmd_code & 0x0F:
            return -errno.EINVAL, no_data
        if ccw.cmd_code & 0x0F == css.CCW_CMD_TIC and ccw.cmd_code & 0xF0:
            return -errno.EINVAL, no_data
        if ccw.flags & (css.CCW_FLAG_MIDA | css.CCW_FLAG_SUSPEND):
            # Suspending is refused unless the ORB allows it, and the fake never allows it.
            return -errno.EINVAL, no_data
        if not ccw.cda:
            if no_data == MAX_NO_DATA_CCWS:
                return -errno.EINVAL, no_data
            no_data += 1
        check_len = not (ccw.flags & css.CCW_FLAG_SLI and not ccw.flags & css.CCW_FLAG_DC)
        stream = memory.stream(addr, ccw)
        if ccw.cmd_code == css.CCW_CMD_NOOP:
            ret = 0
        elif ccw.cmd_code == css.CCW_CMD_BASIC_SENSE:
            ret = self._basic_sense(ccw, stream, check_len)
        elif ccw.cmd_code == css.CCW_CMD_SENSE_ID:
            ret = self._sense_id(ccw, stream, check_len)
        elif ccw.cmd_code == css.CCW_CMD_TIC:
            if self.last_cmd is not None and self.last_cmd.cmd_code == css.CCW_CMD_TIC or ccw.flags or ccw.count:
                ret = -errno.EINVAL
            else:
                self.channel_prog, ret = ccw.cda, -errno.EAGAIN
        else:
            ret = self.device.ccw_cb(self, ccw, stream)
        self.last_cmd = ccw
        if ret == 0 and ccw.flags & css.CCW_FLAG_CC:
            self.channel_prog += CCW_SIZE
            ret = -errno.EAGAIN
        return ret, no_data

    def _basic_sense(self, ccw: CCW1, stream: DataStream, check_len: bool) -> int:
        if check_len and ccw.count != css.SENSE_DATA_SIZE:
            return -errno.EINVAL
        ret = stream.write(bytes(self.sense_data[:min(ccw.count, css.SENSE_DATA_SIZE)]))
        self.scsw.count = stream.residual
        if not ret:
            self.sense_data[:] = bytes(css.SENSE_DATA_SIZE)
        return ret

    def _sense_id(self, ccw: CCW1, stream: DataStream, check_len: bool) -> int:
        """Up to 256 bytes; 0xFF first only when at least the control unit fits."""
        if check_len and ccw.count != css.SENSE_ID_SIZE:
            return -errno.EINVAL
        n = min(ccw.count, css.SENSE_ID_SIZE)
        data = bytearray(self.device.sense_id.pack().ljust(css.SENSE_ID_SIZE, b"\0"))
        data[0] = 0xFF if n >= 4 else 0
        ret = stream.write(bytes(data[:n]))
        if not ret:
            self.scsw.count = stream.residual
        return ret

    def hsch(self) -> int:
        """css_do_hsch then sch_handle_halt_func: a start still held is dropped with it."""
        if self._not_usable():
            return CC_NOT_OPERATIONAL
        scsw = self.scsw
        stctl = scsw.ctrl & css.SCSW_CTRL_MASK_STCTL
        if stctl == css.SCSW_STCTL_STATUS_PEND or stctl & ENDED_WITH_ALERT & ~css.SCSW_STCTL_STATUS_PEND:
            return CC_STATUS_PENDING
        if scsw.ctrl & (css.SCSW_FCTL_HALT_FUNC | css.SCSW_FCTL_CLEAR_FUNC):
            return CC_BUSY
        self.started = None
        scsw.ctrl = scsw.ctrl & ~css.SCSW_FCTL_START_FUNC | css.SCSW_FCTL_HALT_FUNC
        active = scsw.ctrl & (css.SCSW_ACTL_SUBCH_ACTIVE | css.SCSW_ACTL_DEVICE_ACTIVE)
        scsw.ctrl |= css.SCSW_STCTL_STATUS_PEND
        if active or not scsw.ctrl & (css.SCSW_ACTL_START_PEND | css.SCSW_ACTL_SUSP):
            scsw.dstat = css.SCSW_DSTAT_DEVICE_END
        if active or scsw.ctrl & css.SCSW_ACTL_SUSP:
            scsw.cpa = (self.channel_prog + CCW_SIZE) & 0xFFFFFFFF
        self.channel_prog, self.last_cmd = 0, None
        scsw.cstat = 0
        self.schib.pmcw.lpum = 0x80
        self.irq_sink()
        return CC_OK

    def csch(self) -> int:
        """css_do_csch then sch_handle_clear_func: whatever runs is dropped; only cc 3 refuses."""
        if self._not_usable():
            return CC_NOT_OPERATIONAL
        self.started = None
        scsw, pmcw = self.scsw, self.schib.pmcw
        scsw.ctrl = scsw.ctrl & ~(css.SCSW_CTRL_MASK_FCTL | css.SCSW_CTRL_MASK_ACTL) | css.SCSW_FCTL_CLEAR_FUNC
        scsw.ctrl |= css.SCSW_STCTL_STATUS_PEND
        scsw.flags &= ~css.SCSW_FLAGS_MASK_PNO
        scsw.dstat = scsw.cstat = 0
        self.channel_prog, self.last_cmd = 0, None
        pmcw.pom, pmcw.lpum = 0xFF, 0x80
        self.irq_sink()
        return CC_OK

    def stsch(self) -> tuple[int, SCHIB]:
        if not self.operational:
            return CC_NOT_OPERATIONAL, SCHIB()
        return CC_OK, SCHIB.unpack(self.schib.pack())

    def tsch(self) -> IRB | None:
        """The pending status as an IRB (None when there is none, cc 1); the subchannel is then
        cleared of it, its sense data too when it has concurrent sense."""
        if self._not_usable():
            return None
        scsw = self.scsw
        stctl = scsw.ctrl & css.SCSW_CTRL_MASK_STCTL
        if not stctl & css.SCSW_STCTL_STATUS_PEND:
            return None
        irb = IRB(SCSW.unpack(scsw.pack()), esw=(ESW_LPUM, 0, 0, 0, 0))
        if scsw.cstat & _CHECKS:
            irb.scsw.flags |= css.SCSW_FLAGS_MASK_ESWF
            irb.esw = (ESW_CHECKS, 0, 0, 0, 0)
        csense = self.schib.pmcw.chars & css.PMCW_CHARS_MASK_CSENSE
        if scsw.dstat & css.SCSW_DSTAT_UNIT_CHECK and csense:
            irb.scsw.flags |= css.SCSW_FLAGS_MASK_ESWF | css.SCSW_FLAGS_MASK_ECTL
            irb.esw = (irb.esw[0], css.ERW_CONS | css.SENSE_DATA_SIZE << 8, 0, 0, 0)
            irb.ecw = bytes(self.sense_data)
        scsw.ctrl &= ~css.SCSW_CTRL_MASK_STCTL
        if stctl != css.SCSW_STCTL_INTERMEDIATE | css.SCSW_STCTL_STATUS_PEND:
            scsw.ctrl &= ~(css.SCSW_CTRL_MASK_FCTL | _PENDING_ACTL)
            scsw.flags &= ~css.SCSW_FLAGS_MASK_PNO
        if csense:
            self.sense_data[:] = bytes(css.SENSE_DATA_SIZE)
        return irb
