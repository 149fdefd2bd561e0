"""The part of QEMU's channel subsystem (hw/s390x/css.c) a passed-through subchannel meets.

A SubchDev is the guest's view of one subchannel: the SCHIB the guest stores and modifies, the
ORB it started, its sense data. The I/O instructions run here (css_do_ssch and friends) and hand
the work to the subchannel's driver, the vfio-ccw flavour, through the four handlers QEMU's
S390CCWDeviceClass has. What the guest would be told arrives in the ChannelSubsystem: the I/O
interrupts injected and the channel reports queued, in order, for tests to look at.
"""

from __future__ import annotations

import collections
import enum
import errno
from dataclasses import dataclass, replace
from typing import Protocol

from vfio_impl.core.host import Host
from vfio_impl.core.trace import error_report, trace
from vfio_impl.uapi import css as _css
from vfio_impl.uapi.css import CRW, IRB, ORB, SCHIB, SCSW

# QEMU puts devices without a devno of their own in the virtual channel subsystem.
VIRTUAL_CSS_ID = 0xFE
MAX_SCHID = 0xFFFF
CSS_DEVICES = "/sys/bus/css/devices"
_FUNCTIONS = _css.SCSW_FCTL_START_FUNC | _css.SCSW_FCTL_HALT_FUNC | _css.SCSW_FCTL_CLEAR_FUNC
_USABLE = _css.PMCW_FLAGS_MASK_DNV | _css.PMCW_FLAGS_MASK_ENA
# What modify subchannel takes from the guest's SCHIB.
_MSCH_FLAGS = (_css.PMCW_FLAGS_MASK_ISC | _css.PMCW_FLAGS_MASK_ENA | _css.PMCW_FLAGS_MASK_LM
               | _css.PMCW_FLAGS_MASK_MME | _css.PMCW_FLAGS_MASK_MP)
_MSCH_CHARS = _css.PMCW_CHARS_MASK_MBFC | _css.PMCW_CHARS_MASK_XMWME | _css.PMCW_CHARS_MASK_CSENSE
_ENDED_WITH_ALERT = (_css.SCSW_STCTL_PRIMARY | _css.SCSW_STCTL_SECONDARY | _css.SCSW_STCTL_ALERT
                     | _css.SCSW_STCTL_STATUS_PEND)


class IOInstEnding(enum.IntEnum):
    """How an I/O instruction ends: the condition code the guest sees."""

    CC_EXPECTED = 0
    CC_STATUS_PRESENT = 1
    CC_BUSY = 2
    CC_NOT_OPERATIONAL = 3


class S390CCWDriver(Protocol):
    """S390CCWDeviceClass's handlers: what a subchannel's driver does for each function."""

    def handle_request(self) -> IOInstEnding: ...
    def handle_halt(self) -> int: ...
    def handle_clear(self) -> int: ...
    def handle_store(self) -> IOInstEnding: ...


@dataclass(frozen=True, slots=True)
class CssDevId:
    """A subchannel's cssid.ssid.devid, as sysfs names it (0.0.0313)."""

    cssid: int
    ssid: int
    devid: int

    def __str__(self) -> str:
        return f"{self.cssid:x}.{self.ssid:x}.{self.devid:04x}"


@dataclass(frozen=True, slots=True)
class IOInterrupt:
    """What s390_io_interrupt hands the interrupt controller: the guest's I/O interruption code."""

    subchannel_id: int
    subchannel_nr: int
    io_int_parm: int
    io_int_word: int

    @property
    def isc(self) -> int:
        return self.io_int_word >> 27 & 7


class SubchDev:
    """The guest's subchannel: its status (curr_status), the ORB of the running start, the sense
    data a unit check left, and the driver that does the real work."""

    def __init__(self, css: "ChannelSubsystem", cssid: int, ssid: int, schid: int, devno: int):
        self.css = css
        self.cssid = cssid
        self.ssid = ssid
        self.schid = schid
        self.devno = devno
        self.curr_status = SCHIB()
        self.orb = ORB()
        self.sense_data = bytearray(_css.SENSE_DATA_SIZE)
        self.channel_prog = 0
        self.driver: S390CCWDriver | None = None

    @property
    def scsw(self) -> SCSW:
        return self.curr_status.scsw

    @property
    def name(self) -> str:
        return f"{self.cssid:x}.{self.ssid:x}.{self.devno:04x}"

    def _usable(self) -> bool:
        return not ~self.curr_status.pmcw.flags & _USABLE

    # -- the I/O instructions ---------------------------------------------------------------
    def msch(self, schib: SCHIB) -> IOInstEnding:
        """css_do_msch: the guest sets what it may of the PMCW (enable, ISC, concurrent sense...)."""
        if not self.curr_status.pmcw.flags & _css.PMCW_FLAGS_MASK_DNV:
            return IOInstEnding.CC_NOT_OPERATIONAL
        if self.scsw.ctrl & _css.SCSW_STCTL_STATUS_PEND:
            return IOInstEnding.CC_STATUS_PRESENT
        if self.scsw.ctrl & _FUNCTIONS:
            return IOInstEnding.CC_BUSY
        mine, theirs = self.curr_status.pmcw, schib.pmcw
        mine.intparm = theirs.intparm
        mine.flags = mine.flags & ~_MSCH_FLAGS | theirs.flags & _MSCH_FLAGS
        mine.lpm = theirs.lpm
        mine.mbi = theirs.mbi
        mine.chars = mine.chars & ~_MSCH_CHARS | theirs.chars & _MSCH_CHARS
        return IOInstEnding.CC_EXPECTED

    def ssch(self, orb: ORB) -> IOInstEnding:
        """css_do_ssch: start the channel program; the driver's condition code stands, and
        anything but CC_EXPECTED puts the SCSW back as it was."""
        scsw = self.scsw
        if not self._usable():
            return IOInstEnding.CC_NOT_OPERATIONAL
        if scsw.ctrl & _css.SCSW_STCTL_STATUS_PEND:
            return IOInstEnding.CC_STATUS_PRESENT
        if scsw.ctrl & _FUNCTIONS:
            return IOInstEnding.CC_BUSY
        old_ctrl, old_flags = scsw.ctrl, scsw.flags
        self.orb = replace(orb)
        self.channel_prog = orb.cpa
        scsw.ctrl |= _css.SCSW_FCTL_START_FUNC | _css.SCSW_ACTL_START_PEND
        scsw.flags &= ~_css.SCSW_FLAGS_MASK_PNO
        ccode = self.do_subchannel_work_passthrough()
        if ccode != IOInstEnding.CC_EXPECTED:
            self.scsw.ctrl, self.scsw.flags = old_ctrl, old_flags
        return ccode

    def hsch(self) -> IOInstEnding:
        """css_do_hsch."""
        scsw = self.scsw
        if not self._usable():
            return IOInstEnding.CC_NOT_OPERATIONAL
        stctl = scsw.ctrl & _css.SCSW_CTRL_MASK_STCTL
        if stctl == _css.SCSW_STCTL_STATUS_PEND or stctl & (_css.SCSW_STCTL_PRIMARY | _css.SCSW_STCTL_SECONDARY
                                                             | _css.SCSW_STCTL_ALERT):
            return IOInstEnding.CC_STATUS_PRESENT
        if scsw.ctrl & (_css.SCSW_FCTL_HALT_FUNC | _css.SCSW_FCTL_CLEAR_FUNC):
            return IOInstEnding.CC_BUSY
        scsw.ctrl = scsw.ctrl & ~_css.SCSW_FCTL_START_FUNC | _css.SCSW_FCTL_HALT_FUNC | _css.SCSW_ACTL_HALT_PEND
        return self.do_subchannel_work_passthrough()

    def csch(self) -> IOInstEnding:
        """css_do_csch: clear whatever the subchannel was doing."""
        scsw = self.scsw
        if not self._usable():
            return IOInstEnding.CC_NOT_OPERATIONAL
        old_ctrl = scsw.ctrl
        scsw.ctrl = (scsw.ctrl & ~(_css.SCSW_CTRL_MASK_FCTL | _css.SCSW_CTRL_MASK_ACTL)
                     | _css.SCSW_FCTL_CLEAR_FUNC | _css.SCSW_ACTL_CLEAR_PEND)
        ccode = self.do_subchannel_work_passthrough()
        if ccode != IOInstEnding.CC_EXPECTED:
            scsw.ctrl = old_ctrl
        return ccode

    def stsch(self) -> tuple[IOInstEnding, SCHIB]:
        """Store subchannel: the driver refreshes the path information first."""
        ccode = self.driver.handle_store() if self.driver else IOInstEnding.CC_EXPECTED
        return ccode, SCHIB.unpack(self.curr_status.pack())

    def tsch(self) -> tuple[int, IRB]:
        """css_do_tsch_get_irb and css_do_tsch_update_subchannel: the IRB of the pending status
        (with the sense data a passed-through unit check left), and the status is taken."""
        if not self._usable():
            return IOInstEnding.CC_NOT_OPERATIONAL, IRB()
        scsw = self.scsw
        stctl = scsw.ctrl & _css.SCSW_CTRL_MASK_STCTL
        if not stctl & _css.SCSW_STCTL_STATUS_PEND:
            return IOInstEnding.CC_STATUS_PRESENT, IRB(replace(scsw))
        irb = IRB(replace(scsw), ecw=bytes(self.sense_data))
        scsw.ctrl &= ~_css.SCSW_CTRL_MASK_STCTL
        if stctl != _css.SCSW_STCTL_INTERMEDIATE | _css.SCSW_STCTL_STATUS_PEND:
            scsw.ctrl &= ~(_css.SCSW_CTRL_MASK_FCTL | _css.SCSW_ACTL_RESUME_PEND | _css.SCSW_ACTL_START_PEND
                           | _css.SCSW_ACTL_HALT_PEND | _css.SCSW_ACTL_CLEAR_PEND | _css.SCSW_ACTL_SUSP)
            scsw.flags &= ~_css.SCSW_FLAGS_MASK_PNO
        if self.curr_status.pmcw.chars & _css.PMCW_CHARS_MASK_CSENSE:
            self.sense_data[:] = bytes(len(self.sense_data))
        return IOInstEnding.CC_EXPECTED, irb

    # -- the functions, passed through -----------------------------------------------------------
    def do_subchannel_work_passthrough(self) -> IOInstEnding:
        """Clear, halt or start, in that order of precedence. A driver that cannot halt or clear
        (-ENOSYS) leaves the function to the emulation, which ends at once with an interrupt."""
        scsw = self.scsw
        if scsw.ctrl & _css.SCSW_FCTL_CLEAR_FUNC:
            if self._driver_call("handle_clear") == -errno.ENOSYS:
                sch_handle_clear_func(self)
                self.css.inject_io_interrupt(self)
        elif scsw.ctrl & _css.SCSW_FCTL_HALT_FUNC:
            if self._driver_call("handle_halt") == -errno.ENOSYS:
                sch_handle_halt_func(self)
                self.css.inject_io_interrupt(self)
        elif scsw.ctrl & _css.SCSW_FCTL_START_FUNC:
            if not scsw.ctrl & _css.SCSW_ACTL_SUSP:
                self.curr_status.pmcw.intparm = self.orb.intparm
            if self.driver is None:
                return IOInstEnding.CC_STATUS_PRESENT
            return self.driver.handle_request()
        return IOInstEnding.CC_EXPECTED

    def _driver_call(self, handler: str) -> int:
        return getattr(self.driver, handler)() if self.driver else -errno.ENOSYS


def sch_gen_unit_exception(sch: SubchDev) -> None:
    """The start ends at once with unit exception status, as the seed's css.h words it."""
    scsw = sch.scsw
    scsw.ctrl = scsw.ctrl & ~_css.SCSW_ACTL_START_PEND | _ENDED_WITH_ALERT
    scsw.cpa = (sch.channel_prog + 8) & 0xFFFFFFFF
    scsw.dstat = _css.SCSW_DSTAT_UNIT_EXCEP


def sch_handle_clear_func(sch: SubchDev) -> None:
    """The emulated clear: it always succeeds on the one path there is."""
    pmcw, scsw = sch.curr_status.pmcw, sch.scsw
    pmcw.pom = 0xFF
    scsw.flags &= ~_css.SCSW_FLAGS_MASK_PNO
    sch.channel_prog = 0
    scsw.ctrl = scsw.ctrl & ~_css.SCSW_ACTL_CLEAR_PEND | _css.SCSW_STCTL_STATUS_PEND
    scsw.dstat = scsw.cstat = 0
    pmcw.lpum = 0x80


def sch_handle_halt_func(sch: SubchDev) -> None:
    """The emulated halt: device end unless a start was still pending, and always success."""
    pmcw, scsw = sch.curr_status.pmcw, sch.scsw
    curr_ccw = sch.channel_prog
    sch.channel_prog = 0
    scsw.ctrl = scsw.ctrl & ~_css.SCSW_ACTL_HALT_PEND | _css.SCSW_STCTL_STATUS_PEND
    active = scsw.ctrl & (_css.SCSW_ACTL_SUBCH_ACTIVE | _css.SCSW_ACTL_DEVICE_ACTIVE)
    if active or not scsw.ctrl & (_css.SCSW_ACTL_START_PEND | _css.SCSW_ACTL_SUSP):
        scsw.dstat = _css.SCSW_DSTAT_DEVICE_END
    if active or scsw.ctrl & _css.SCSW_ACTL_SUSP:
        scsw.cpa = (curr_ccw + 8) & 0xFFFFFFFF
    scsw.cstat = 0
    pmcw.lpum = 0x80


class ChannelSubsystem:
    """QEMU's channel_subsys for one machine: subchannels by id, the channel paths seen, the
    I/O interrupts injected and the CRWs waiting for the guest's store channel report word."""

    def __init__(self) -> None:
        self.subchannels: dict[tuple[int, int, int], SubchDev] = {}
        self.chpids: dict[int, int] = {}
        self.io_interrupts: list[IOInterrupt] = []
        self.pending_crws: collections.deque[CRW] = collections.deque()
        self.do_crw_mchk = True
        self.crw_mchks = 0

    def create_sch(self) -> SubchDev:
        """css_create_sch with no devno given: the first free one in the virtual css, where the
        subchannel number follows the device number."""
        used = {schid for cssid, ssid, schid in self.subchannels if (cssid, ssid) == (VIRTUAL_CSS_ID, 0)}
        schid = next(n for n in range(MAX_SCHID + 1) if n not in used)
        sch = SubchDev(self, VIRTUAL_CSS_ID, 0, schid, schid)
        self.subchannels[(sch.cssid, sch.ssid, sch.schid)] = sch
        return sch

    def subch_release(self, sch: SubchDev) -> None:
        self.subchannels.pop((sch.cssid, sch.ssid, sch.schid), None)

    def sch_build_schib(self, sch: SubchDev, dev_id: CssDevId, host: Host) -> int:
        """css_sch_build_schib: the path masks and channel paths as the host's sysfs has them;
        -EINVAL (after an error report) when a file is missing or does not parse."""
        pmcw = sch.curr_status.pmcw
        pmcw.flags, pmcw.devno = _css.PMCW_FLAGS_MASK_DNV, sch.devno
        base = f"{CSS_DEVICES}/{dev_id}"
        masks = _read_hex(host, f"{base}/pimpampom", 3, "css_sch_get_path_masks")
        if masks is None:
            return -errno.EINVAL
        pmcw.pim, pmcw.pam, pmcw.pom = masks
        chpids = _read_hex(host, f"{base}/chpids", 8, "css_sch_get_chpids")
        if chpids is None:
            return -errno.EINVAL
        pmcw.chpid = bytes(chpids)
        for chpid in filter(None, chpids):
            if chpid not in self.chpids:
                chp_type = _read_hex(host, f"/sys/devices/css{dev_id.cssid:x}/chp0.{chpid:02x}/type", 1,
                                     "css_sch_get_chpid_type")
                if chp_type is None:
                    return -errno.EINVAL
                self.chpids[chpid] = chp_type[0]
        sch.curr_status.scsw = SCSW()
        sch.curr_status.mba = 0
        return 0

    def inject_io_interrupt(self, sch: SubchDev) -> None:
        """css_inject_io_interrupt: the subchannel's ISC and interruption parameter go with it."""
        pmcw = sch.curr_status.pmcw
        trace("css_io_interrupt", cssid=sch.cssid, ssid=sch.ssid, schid=sch.schid, intparm=pmcw.intparm,
              isc=pmcw.isc)
        self.io_interrupts.append(IOInterrupt(sch.cssid << 8 | 1 << 3 | sch.ssid << 1 | 1, sch.schid,
                                              pmcw.intparm, pmcw.isc << 27))

    def crw_add_to_queue(self, crw: CRW) -> None:
        """Queue a CRW; the first one since the guest emptied the queue raises a machine check."""
        trace("css_crw", rsc=crw.rsc, erc=crw.erc, rsid=crw.rsid,
              chained=bool(crw.flags & _css.CRW_FLAGS_MASK_C))
        self.pending_crws.append(crw)
        if self.do_crw_mchk:
            self.do_crw_mchk = False
            self.crw_mchks += 1

    def stcrw(self) -> CRW | None:
        """Store channel report word: the oldest CRW; none turns the machine checks back on."""
        if self.pending_crws:
            return self.pending_crws.popleft()
        self.do_crw_mchk = True
        return None


def _read_hex(host: Host, path: str, count: int, func: str) -> list[int] | None:
    """fopen and fscanf of `count` hex numbers; the open failure is reported in QEMU's words."""
    try:
        words = host.read_text(path).split()
    except OSError:
        error_report(f"{func}: open {path} failed")
        return None
    try:
        values = [int(w, 16) for w in words[:count]]
    except ValueError:
        return None
    return values if len(values) == count else None
