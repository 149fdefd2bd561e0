"""vfio-ccw in the fake kernel: what drivers/s390/cio/vfio_ccw_*.c do for one subchannel's mdev.

The I/O region (index 0) carries ORB, SCSW, IRB and ret_code; a write runs the driver's state
machine, which translates the channel program (vfio_ccw_cp.py: copied to kernel memory, its data
pinned through the container's IOMMU) and issues start subchannel. A non-zero ret_code comes back
as the write's errno. The optional regions follow, each found through its type capability: async
command (halt, clear), schib (a store subchannel) and CRW (one queued channel report per read).
Region N starts at N << 10. The I/O interrupt copies the IRB into the I/O region and signals the
I/O eventfd; a channel-path event queues a CRW and signals the CRW eventfd.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import errno
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from vfio_impl import uapi
from vfio_impl.uapi import css
from vfio_impl.uapi.css import CRW, IRB, ORB, SCSW

from .devices.ccw_subchannel import CC_BUSY, CC_NOT_OPERATIONAL, CC_OK, CC_STATUS_PENDING, CcwDevice, Subchannel
from .err import MAX_ERRNO, error
from .irq import IRQContext, validate_and_prepare
from .sysfs import path_mask
from .vfio_ccw_cp import ChannelProgram
from .vfio_main import VfioDevice

if TYPE_CHECKING:
    from .kernel import FakeKernel
    from .topology import CcwDeviceSpec

VFIO_CCW_OFFSET_SHIFT = 10
VFIO_CCW_OFFSET_MASK = (1 << VFIO_CCW_OFFSET_SHIFT) - 1
# The interruption subclass vfio_ccw enables its subchannels with (asm/isc.h: IO_SCH_ISC).
VFIO_CCW_ISC = 3
RW = uapi.VFIO_REGION_INFO_FLAG_READ | uapi.VFIO_REGION_INFO_FLAG_WRITE
RET_CODE = struct.Struct("=i")
IO_RET_CODE = uapi.ccw_io_region.offsetof("ret_code")
CMD_RET_CODE = uapi.ccw_cmd_region.offsetof("ret_code")


class State(enum.Enum):
    NOT_OPER = "not operational"
    STANDBY = "standby"
    IDLE = "idle"
    CP_PROCESSING = "cp processing"
    CP_PENDING = "cp pending"


class ChpEvent(enum.Enum):
    """What cio tells the driver about one of the subchannel's channel paths."""

    VARY_OFF = "vary off"
    VARY_ON = "vary on"
    OFFLINE = "offline"
    ONLINE = "online"


@dataclass(slots=True)
class Planned:
    """One planned answer; see VfioCcwDevice.plan."""

    errno: int = 0
    ret_code: int | None = None
    count: int | None = None


@dataclass(slots=True)
class CcwRegion:
    """One region as vfio_ccw registers it: its bytes, its access rules and its handlers.
    `size` is the struct's, which bounds every access whatever size REGION_INFO reports."""

    name: str
    subtype: int
    size: int
    flags: int
    data: bytearray
    read: Callable[["CcwRegion", int, int], bytes]
    write: Callable[["CcwRegion", int, bytes], int]


class VfioCcwDevice(VfioDevice):
    """The vfio_ccw driver state of one subchannel and its mdev: regions, FSM, triggers, CRWs.

    Failure injection: `plan(access, ...)` queues the answer to the next access of one kind, and
    each planned answer is used once, in the order given. An access is "<region>-<read|write>",
    the region being "io", "async", "schib" or "crw". A plan gives one of:
      errno=E      the access fails with E before the driver looks at the region, as a failed
                   copy_from_user (EFAULT), a contended io_mutex (EAGAIN) or a subchannel that
                   went away (ENODEV) make it;
      ret_code=R   (writes) the state machine is skipped and answers R, which the write returns
                   as vfio_ccw does: 0 is a full write, a negative R its errno, a positive R a
                   short count;
      count=N      the access moves only N bytes and returns N; a short write reaches no further.
    So plan("io-write", errno=EAGAIN) is "EAGAIN once, then the real thing".
    """

    driver = "vfio_ccw_mdev"
    offset_shift = VFIO_CCW_OFFSET_SHIFT
    echoes_cap_offset = True

    # vfio_register_emulated_iommu_dev: the mdev's group has no IOMMU domain behind it.
    emulated_iommu = True

    def __init__(self, kernel: "FakeKernel", spec: "CcwDeviceSpec", model: CcwDevice):
        super().__init__(kernel, spec, spec.uuid)
        self.model = model
        pim = path_mask(spec.chpids or ())
        self.subchannel = Subchannel(spec.devno, tuple(spec.chpids or ()), model, pim)
        self.subchannel.irq_sink = self._sch_irq
        self.io_region = bytearray(uapi.ccw_io_region.size)
        self.io = CcwRegion("io", 0, uapi.ccw_io_region.size, RW, self.io_region, self._read_bytes, self._io_write)
        self.regions: list[CcwRegion] = []
        self.state = State.STANDBY
        self.lpm = pim
        self.irqs = [IRQContext() for _ in range(uapi.VFIO_CCW_NUM_IRQS)]
        self.crws: collections.deque[CRW] = collections.deque()
        self.planned: dict[str, collections.deque[Planned]] = collections.defaultdict(collections.deque)
        self.set_irqs_log: list[tuple[int, int, int, int]] = []
        self.requests: list[ORB] = []
        self.cp: ChannelProgram | None = None
        # The interruption parameter: the kernel's subchannel pointer; any unique word will do.
        self.intparm = id(self) & 0xFFFFFFFF
        self._in_fsm = False

    # -- failure injection ----------------------------------------------------------------------
    def plan(self, access: str, *, errno: int = 0, ret_code: int | None = None, count: int | None = None) -> None:
        region, _, op = access.partition("-")
        if region not in ("io", "async", "schib", "crw") or op not in ("read", "write"):
            raise ValueError(f"no access {access!r}: '<io|async|schib|crw>-<read|write>'")
        self.planned[access].append(Planned(errno, ret_code, count))

    # -- what GET_INFO reports ------------------------------------------------------------------
    @property
    def flags(self) -> int:
        if self.spec.flags is not None:
            return self.spec.flags
        return uapi.VFIO_DEVICE_FLAGS_CCW | uapi.VFIO_DEVICE_FLAGS_RESET

    @property
    def num_regions(self) -> int:
        if self.spec.num_regions is not None:
            return self.spec.num_regions
        return uapi.VFIO_CCW_NUM_REGIONS + len(self.regions)

    @property
    def num_irqs(self) -> int:
        return uapi.VFIO_CCW_NUM_IRQS if self.spec.num_irqs is None else self.spec.num_irqs

    # -- open / close / reset -------------------------------------------------------------------
    def open_device(self) -> None:
        """vfio_ccw_mdev_open_device, on the first open only: the optional regions, then the OPEN
        event enables the subchannel; a subchannel that is not operational cannot be opened."""
        if self.open_count:
            self.open_count += 1
            return
        if self.state is State.NOT_OPER:
            raise error(errno.EINVAL, "the subchannel is not operational")
        self._register_regions()
        self._fsm_open()
        if self.state is State.NOT_OPER:
            self.regions = []
            raise error(errno.EINVAL, "the subchannel could not be enabled")
        self.open_count += 1

    def close_device(self) -> None:
        """On the last close, the CLOSE event disables the subchannel; the regions go, the
        triggers stay set."""
        self.open_count -= 1
        if self.open_count:
            return
        self._fsm_close()
        self.regions = []

    def release(self) -> None:
        for ctx in self.irqs:
            ctx.set_trigger(-1)

    def reset(self) -> None:
        """VFIO_DEVICE_RESET is CLOSE then OPEN: EINVAL if that leaves it not operational."""
        self._fsm_close()
        self._fsm_open()
        self.resets += 1
        if self.state is State.NOT_OPER:
            raise error(errno.EINVAL, "the subchannel is not operational")

    def _fsm_open(self) -> None:
        """fsm_open enables the subchannel from STANDBY; OPEN in any other state, or an enable
        that fails, leaves it not operational."""
        if self.state is State.STANDBY and self.subchannel.enable(VFIO_CCW_ISC, self.intparm) == CC_OK:
            self.state = State.IDLE
        else:
            self.state = State.NOT_OPER

    def _fsm_close(self) -> None:
        """fsm_close: disable, clearing first when the subchannel is busy (vfio_ccw_sch_quiesce)."""
        if self.state in (State.NOT_OPER, State.STANDBY) or not self.subchannel.enabled:
            self.state = State.NOT_OPER
            return
        cc = self.subchannel.disable()
        if cc in (CC_STATUS_PENDING, CC_BUSY):
            # The clear's interrupt is taken at once (_sch_irq), which makes way for the disable.
            self.subchannel.csch()
            cc = self.subchannel.disable()
        self.state = State.STANDBY if cc == CC_OK else State.NOT_OPER
        self._cp_free()

    def _register_regions(self) -> None:
        known = {
            "async": (uapi.VFIO_REGION_SUBTYPE_CCW_ASYNC_CMD, uapi.ccw_cmd_region.size, RW,
                      self._read_bytes, self._async_write),
            "schib": (uapi.VFIO_REGION_SUBTYPE_CCW_SCHIB, uapi.ccw_schib_region.size,
                      uapi.VFIO_REGION_INFO_FLAG_READ, self._schib_read, self._refuse_write),
            "crw": (uapi.VFIO_REGION_SUBTYPE_CCW_CRW, uapi.ccw_crw_region.size,
                    uapi.VFIO_REGION_INFO_FLAG_READ, self._crw_read, self._refuse_write),
        }
        self.regions = []
        for name in self.spec.regions:
            subtype, size, flags, read, write = known[name]
            self.regions.append(CcwRegion(name, subtype, size, flags, bytearray(size), read, write))

    # -- regions ---------------------------------------------------------------------------------
    def region_info(self, index: int) -> tuple[int, int, tuple]:
        """The I/O region plainly; every other one with its type capability."""
        region = self._region(index)
        size = self.spec.sizes.get(region.name, region.size)
        if region is self.io:
            return region.flags, size, ()
        return region.flags, size, (uapi.RegionTypeCap(uapi.VFIO_REGION_TYPE_CCW, region.subtype),)

    def _region(self, index: int) -> CcwRegion:
        if index == uapi.VFIO_CCW_CONFIG_REGION_INDEX:
            return self.io
        if index >= uapi.VFIO_CCW_NUM_REGIONS + len(self.regions):
            raise error(errno.EINVAL, "region index out of range")
        return self.regions[index - uapi.VFIO_CCW_NUM_REGIONS]

    def rw(self, offset: int, data: bytes | None, count: int):
        """vfio_ccw_mdev_read/write: a region's own handler, after the bounds every one checks."""
        region, pos = self._region(offset >> VFIO_CCW_OFFSET_SHIFT), offset & VFIO_CCW_OFFSET_MASK
        if pos + count > region.size:
            raise error(errno.EINVAL, "beyond the region")
        planned = self.planned[f"{region.name}-{'read' if data is None else 'write'}"]
        if planned:
            return self._planned(region, pos, data, count, planned.popleft())
        if data is None:
            return region.read(region, pos, count)
        return region.write(region, pos, data)

    def _planned(self, region: CcwRegion, pos: int, data: bytes | None, count: int, plan: Planned):
        if plan.errno:
            raise error(plan.errno, f"planned {region.name} access failure")
        if plan.ret_code is not None and data is not None:
            at = IO_RET_CODE if region.name == "io" else CMD_RET_CODE
            RET_CODE.pack_into(region.data, at, plan.ret_code)
            return _write_result(plan.ret_code, count)
        n = count if plan.count is None else min(plan.count, count)
        if data is None:
            return bytes(region.data[pos:pos + n])
        region.data[pos:pos + n] = data[:n]
        return n

    def _read_bytes(self, region: CcwRegion, pos: int, count: int) -> bytes:
        return bytes(region.data[pos:pos + count])

    def _refuse_write(self, region: CcwRegion, pos: int, data: bytes) -> int:
        raise error(errno.EINVAL, f"the {region.name} region is read-only")

    def _io_write(self, region: CcwRegion, pos: int, data: bytes) -> int:
        """vfio_ccw_mdev_write_io_region: the IO_REQ event, then ret_code or the count."""
        region.data[pos:pos + len(data)] = data
        with self._fsm_event():
            {State.NOT_OPER: self._io_error, State.STANDBY: self._io_error, State.IDLE: self._io_request,
             State.CP_PROCESSING: self._io_retry, State.CP_PENDING: self._io_busy}[self.state]()
        return _write_result(RET_CODE.unpack_from(region.data, IO_RET_CODE)[0], len(data))

    def _async_write(self, region: CcwRegion, pos: int, data: bytes) -> int:
        """vfio_ccw_async_region_write: the ASYNC_REQ event with halt or clear."""
        region.data[pos:pos + len(data)] = data
        command = uapi.ccw_cmd_region.unpack(region.data).command
        with self._fsm_event():
            if self.state in (State.NOT_OPER, State.STANDBY):
                ret = -errno.EIO
            elif self.state is State.CP_PROCESSING:
                ret = -errno.EAGAIN
            elif command == uapi.VFIO_CCW_ASYNC_CMD_HSCH:
                ret = {CC_OK: 0, CC_NOT_OPERATIONAL: -errno.ENODEV}.get(self.subchannel.hsch(), -errno.EBUSY)
            elif command == uapi.VFIO_CCW_ASYNC_CMD_CSCH:
                ret = {CC_OK: 0, CC_NOT_OPERATIONAL: -errno.ENODEV}[self.subchannel.csch()]
            else:
                ret = -errno.EINVAL
        RET_CODE.pack_into(region.data, CMD_RET_CODE, ret)
        return _write_result(ret, len(data))

    def _schib_read(self, region: CcwRegion, pos: int, count: int) -> bytes:
        """A store subchannel to the hardware each time; ENODEV when the subchannel is gone."""
        cc, schib = self.subchannel.stsch()
        if cc != CC_OK:
            raise error(errno.ENODEV, "cio_update_schib failed")
        region.data[:css.SCHIB.SIZE] = schib.pack()
        return bytes(region.data[pos:pos + count])

    def _crw_read(self, region: CcwRegion, pos: int, count: int) -> bytes:
        """One queued CRW per read (zero when none), and the eventfd again while more wait."""
        crw = self.crws.popleft() if self.crws else CRW()
        at = uapi.ccw_crw_region.offsetof("crw")
        region.data[at:at + 4] = crw.pack()
        data = bytes(region.data[pos:pos + count])
        region.data[at:at + 4] = bytes(4)
        if self.crws:
            self.irqs[uapi.VFIO_CCW_CRW_IRQ_INDEX].signal()
        return data

    def mmap(self, offset: int, length: int, prot: int):
        raise error(errno.EINVAL, "vfio-ccw regions cannot be mmapped")

    # -- the state machine -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _fsm_event(self):
        """Interrupts the subchannel raises while an event runs are taken after it, as the
        subchannel lock would hold them off."""
        self._in_fsm = True
        try:
            yield
        finally:
            self._in_fsm = False
            self._sch_irq()

    def _set_io_ret_code(self, ret: int) -> None:
        RET_CODE.pack_into(self.io_region, IO_RET_CODE, ret)

    def _io_error(self) -> None:
        self._set_io_ret_code(-errno.EIO)

    def _io_retry(self) -> None:
        self._set_io_ret_code(-errno.EAGAIN)

    def _io_busy(self) -> None:
        self._set_io_ret_code(-errno.EBUSY)

    def _io_request(self) -> None:
        """fsm_io_request: only a start function; the channel program is translated (cp_init,
        cp_prefetch) before start subchannel."""
        self.state = State.CP_PROCESSING
        scsw = SCSW.unpack(self.io_region, uapi.ccw_io_region.offsetof("scsw_area"))
        if scsw.ctrl & css.SCSW_FCTL_START_FUNC:
            orb = ORB.unpack(self.io_region, uapi.ccw_io_region.offsetof("orb_area"))
            self.requests.append(orb)
            ret = -errno.EOPNOTSUPP if orb.ctrl0 & css.ORB_CTRL0_MASK_INVALID else self._cp_start(orb)
            self._set_io_ret_code(ret)
            if not ret:
                return
        elif scsw.ctrl & (css.SCSW_FCTL_HALT_FUNC | css.SCSW_FCTL_CLEAR_FUNC):
            self._set_io_ret_code(-errno.EOPNOTSUPP)
        self.state = State.IDLE

    def _cp_start(self, orb: ORB) -> int:
        iommu = self.iommu()
        if iommu is None:
            return -errno.EINVAL
        self.cp = ChannelProgram(iommu)
        ret = self.cp.init(orb) or self.cp.prefetch() or self._io_helper()
        if ret:
            self._cp_free()
        return ret

    def _cp_free(self) -> None:
        if self.cp is not None:
            self.cp.free()
            self.cp = None

    def _io_helper(self) -> int:
        """fsm_io_helper: start subchannel; cc 3 takes the ORB's paths out of the logical path
        mask, and leaves EACCES while other paths remain, ENODEV otherwise."""
        orb = self.cp.get_orb(self.intparm, self.lpm)
        cc = self.subchannel.ssch(orb, self.cp)
        if cc == CC_OK:
            self.state = State.CP_PENDING
            return 0
        if cc != CC_NOT_OPERATIONAL:
            return -errno.EBUSY
        self.lpm = self.lpm & ~orb.lpm if orb.lpm else 0
        if self.subchannel.stsch()[0] != CC_OK:
            return -errno.ENODEV
        return -errno.EACCES if self.lpm else -errno.ENODEV

    def _sch_irq(self) -> None:
        """vfio_ccw_sch_irq, then vfio_ccw_sch_io_todo: each pending IRB goes to the I/O region
        and the I/O eventfd is signalled; a final status ends the channel program."""
        if self._in_fsm:
            return
        while (irb := self.subchannel.tsch()) is not None:
            if self.state in (State.NOT_OPER, State.STANDBY):
                continue
            self._io_todo(irb)

    def _io_todo(self, irb: IRB) -> None:
        """vfio_ccw_sch_io_todo: a solicited status gets the guest's address back while its
        program lives; a final one ends the program the driver is waiting on."""
        scsw = irb.scsw
        final = not scsw.ctrl & (css.SCSW_ACTL_DEVICE_ACTIVE | css.SCSW_ACTL_SUBCH_ACTIVE)
        alert_only = scsw.ctrl & css.SCSW_CTRL_MASK_STCTL == css.SCSW_STCTL_STATUS_PEND | css.SCSW_STCTL_ALERT
        if (scsw.cc or not alert_only) and self.cp is not None:
            self.cp.update_scsw(scsw)
            if final and self.state is State.CP_PENDING:
                self._cp_free()
                self.state = State.IDLE
        at = uapi.ccw_io_region.offsetof("irb_area")
        self.io_region[at:at + css.IRB.SIZE] = irb.pack()
        self.irqs[uapi.VFIO_CCW_IO_IRQ_INDEX].signal()

    # -- channel paths and CRWs --------------------------------------------------------------------
    def chp_event(self, chpid: int, event: ChpEvent) -> int:
        """vfio_ccw_chp_event: a path going or coming changes the masks, and going offline or
        coming online queues a channel-path CRW for the guest."""
        chpids = self.spec.chpids or ()
        mask = sum(0x80 >> i for i, c in enumerate(chpids) if c == chpid)
        if not mask:
            return 0
        if not self.subchannel.operational:
            return -errno.ENODEV
        pmcw = self.subchannel.schib.pmcw
        if event is ChpEvent.VARY_OFF:
            self.lpm &= ~mask
        elif event is ChpEvent.OFFLINE:
            pmcw.pam &= ~mask
            self.lpm &= ~mask
            self.queue_crw(css.CRW_RSC_CHP, css.CRW_ERC_PERRN, chpid)
        elif event is ChpEvent.VARY_ON:
            self.lpm |= mask
        else:
            pmcw.pam |= mask
            self.lpm |= mask
            self.queue_crw(css.CRW_RSC_CHP, css.CRW_ERC_INIT, chpid)
        return 0

    def queue_crw(self, rsc: int, erc: int, rsid: int) -> None:
        self.crws.append(CRW.build(rsc, erc, rsid))
        self.irqs[uapi.VFIO_CCW_CRW_IRQ_INDEX].signal()

    # -- interrupts ---------------------------------------------------------------------------------
    def irq_info(self, index: int) -> tuple[int, int]:
        if index >= uapi.VFIO_CCW_NUM_IRQS:
            raise error(errno.EINVAL, "irq index out of range")
        return uapi.VFIO_IRQ_INFO_EVENTFD, self.spec.irq_count

    def set_irqs(self, buf: bytearray) -> int:
        """vfio_ccw_mdev_set_irqs: one vector per index, and only the TRIGGER action."""
        hdr = uapi.vfio_irq_set.unpack(buf)
        self.set_irqs_log.append((hdr.index, hdr.flags, hdr.start, hdr.count))
        data_type, data = validate_and_prepare(hdr, buf, 1, uapi.VFIO_CCW_NUM_IRQS)
        if not hdr.flags & uapi.VFIO_IRQ_SET_ACTION_TRIGGER:
            raise error(errno.EINVAL, "vfio-ccw takes the TRIGGER action only")
        ctx = self.irqs[hdr.index]
        if data_type == uapi.VFIO_IRQ_SET_DATA_EVENTFD:
            if not data:
                raise error(errno.EFAULT, "no eventfd after the header")
            if data[0] < -1:
                raise error(errno.EINVAL, "an eventfd below -1")
            ctx.set_trigger(data[0])
        elif data_type == uapi.VFIO_IRQ_SET_DATA_NONE or (data and data[0]):
            ctx.signal()
        return 0


def _write_result(ret_code: int, count: int) -> int:
    """What the write returns: the ret_code when there is one, else the count. Only a ret_code
    in -MAX_ERRNO..-1 is an error; past that, like a positive one left by the user in a request
    the state machine ignored, the syscall returns it as it is."""
    if -MAX_ERRNO <= ret_code < 0:
        raise error(-ret_code, f"vfio-ccw ret_code {ret_code}")
    return ret_code or count
