"""vfio-ccw in the fake kernel, through the Host API only: the 'ccw' topology's sysfs, the mdev's
info ioctls and their argsz, the regions at index << 10, SET_IRQS, the state machine and the
channel program it pins and starts, the subchannel's own answers, CRWs and failure injection."""

import ctypes
import errno
import mmap
import os
import struct

import pytest

from conformance.raw import RawSession, errno_of
from fakekernel import FakeKernel, Topology
from fakekernel.devices import ccw_block, ccw_subchannel, ccw_virtio
from fakekernel.topology import GUEST_MDEV_UUID, CcwDeviceSpec
from fakekernel.vfio_ccw import ChpEvent, State
from vfio_impl import uapi
from vfio_impl.core import irq
from vfio_impl.uapi import css
from vfio_impl.uapi.css import CCW0, CCW1, CRW, IRB, ORB, SCHIB, SCSW

SCH = "0.0.0313"
UUID = "8a1c0bd0-7e7a-4f6a-9c3e-000000000313"
IOVA, SIZE = 0x10000, 0x10000
PROGRAM, DATA = 0x100, 0x1000
IO, ASYNC, SCHIB_REGION, CRW_REGION = 0, 1 << 10, 2 << 10, 3 << 10
FMT_PFCH = css.ORB_CTRL0_MASK_FMT | css.ORB_CTRL0_MASK_PFCH
START = css.SCSW_FCTL_START_FUNC
CE_DE = css.SCSW_DSTAT_CHANNEL_END | css.SCSW_DSTAT_DEVICE_END
TRIGGER_EVENTFD = uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_TRIGGER
RET_CODE = struct.Struct("=i")


class Mdev:
    """An opened mdev in a type1 container with guest memory mapped at IOVA and the I/O
    eventfd wired: what a VMM has before its first start subchannel."""

    def __init__(self, k, schid=SCH, readonly=False):
        spec = next(d for d in k.topology.ccw if d.schid == schid)
        self.k, self.fake = k, k.ccw_device(schid)
        self.session = RawSession(k, None)
        self.container, group = self.session.container(), self.session.group(spec.group)
        self.session.set_container(group, self.container)
        k.ioctl(self.container, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
        self.fd = self.session.device(group, spec.uuid)
        self.mem = mmap.mmap(-1, SIZE)
        vaddr = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
        flags = uapi.VFIO_DMA_MAP_FLAG_READ | (0 if readonly else uapi.VFIO_DMA_MAP_FLAG_WRITE)
        k.ioctl(self.container, uapi.VFIO_IOMMU_MAP_DMA,
                uapi.vfio_iommu_type1_dma_map.pack(flags=flags, vaddr=vaddr, iova=IOVA, size=SIZE))
        self.io_eventfd = self.wire(uapi.VFIO_CCW_IO_IRQ_INDEX)

    def wire(self, index: int) -> int:
        fd = self.session.eventfd()
        self.k.ioctl(self.fd, uapi.VFIO_DEVICE_SET_IRQS, irq.eventfds(index, 0, [fd]))
        return fd

    def program(self, *ccws) -> None:
        for i, ccw in enumerate(ccws):
            self.mem[PROGRAM + 8 * i:PROGRAM + 8 * i + 8] = ccw.pack()

    def request(self, orb: ORB | None = None, ctrl: int = START) -> int:
        """One write of the I/O region; its errno, 0 when it went through."""
        region = bytearray(uapi.ccw_io_region.size)
        region[0:12] = (orb or ORB(0x1234, FMT_PFCH, 0, 0, IOVA + PROGRAM)).pack()
        region[12:24] = SCSW(ctrl=ctrl).pack()
        return errno_of(self.k.pwrite, self.fd, bytes(region), IO)

    def command(self, command: int) -> int:
        return errno_of(self.k.pwrite, self.fd, bytes(uapi.ccw_cmd_region.pack(command=command)), ASYNC)

    def irb(self) -> IRB:
        assert self.signalled(self.io_eventfd), "no I/O interrupt"
        return IRB.unpack(self.k.pread(self.fd, uapi.ccw_io_region.size, IO), 24)

    def ret_code(self) -> int:
        return RET_CODE.unpack(self.k.pread(self.fd, 4, IO + 120))[0]

    @staticmethod
    def signalled(fd: int) -> int:
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        self.session.close()
        self.mem.close()


@pytest.fixture
def k():
    with FakeKernel("ccw") as kernel:
        yield kernel


@pytest.fixture
def m(k):
    dev = Mdev(k)
    yield dev
    dev.close()


def two_paths():
    """A subchannel with two channel paths, 0x11 and 0x12."""
    spec = CcwDeviceSpec(SCH, UUID, group=30, chpids=(0x11, 0x12))
    return FakeKernel(Topology(name="two-paths", ccw=[spec]))


# -- sysfs ------------------------------------------------------------------------------------
def test_the_subchannel_and_its_mdev_in_sysfs(k):
    sch = f"/sys/bus/css/devices/{SCH}"
    assert k.readlink(sch) == f"../../../devices/css0/{SCH}"
    assert k.readlink(f"/sys/bus/mdev/devices/{UUID}") == f"../../../devices/css0/{SCH}/{UUID}"
    assert k.read_text(f"{sch}/chpids") == "11 00 00 00 00 00 00 00 \n"
    assert k.read_text(f"{sch}/pimpampom") == "80 80 ff\n"
    assert k.read_text("/sys/devices/css0/chp0.11/type") == "1b\n"
    assert k.readlink(f"{sch}/{UUID}/driver").endswith("/bus/mdev/drivers/vfio_ccw_mdev")
    assert k.readlink(f"{sch}/{UUID}/iommu_group") == "../../../../kernel/iommu_groups/30"
    assert k.listdir("/sys/kernel/iommu_groups/30/devices") == [UUID]
    assert k.exists("/dev/vfio/30") and not k.exists(f"{sch}/{UUID}/../../0.0.0315/iommu_group")


def test_the_device_is_the_mdev_uuid_not_the_subchannel(k):
    session = RawSession(k, None)
    c, g = session.container(), session.group(30)
    session.set_container(g, c)
    k.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
    assert errno_of(session.device, g, SCH) == errno.ENODEV
    first = session.device(g, UUID)
    assert k.ccw_device(SCH).state is State.IDLE
    session.device(g, UUID)
    session.close_fd(first)
    assert k.ccw_device(SCH).state is State.IDLE and k.ccw_device(SCH).open_count == 1
    session.close()
    assert k.ccw_device(SCH).state is State.STANDBY


# -- info ioctls ------------------------------------------------------------------------------
def test_device_info_copies_back_minsz_only(m):
    buf = uapi.vfio_device_info.pack(argsz=64, cap_offset=0x5A5A)
    m.k.ioctl(m.fd, uapi.VFIO_DEVICE_GET_INFO, buf)
    info = uapi.vfio_device_info.unpack(buf)
    assert (info.argsz, info.flags, info.num_regions, info.num_irqs, info.cap_offset) == \
        (64, uapi.VFIO_DEVICE_FLAGS_CCW | uapi.VFIO_DEVICE_FLAGS_RESET, 4, 3, 0x5A5A)


def test_regions_sit_at_index_shifted_by_10_and_carry_their_type(m):
    expected = [(uapi.ccw_io_region.size, uapi.VFIO_REGION_INFO_FLAG_READ | uapi.VFIO_REGION_INFO_FLAG_WRITE, None),
                (uapi.ccw_cmd_region.size, 11, uapi.VFIO_REGION_SUBTYPE_CCW_ASYNC_CMD),
                (uapi.ccw_schib_region.size, 9, uapi.VFIO_REGION_SUBTYPE_CCW_SCHIB),
                (uapi.ccw_crw_region.size, 9, uapi.VFIO_REGION_SUBTYPE_CCW_CRW)]
    for index, (size, flags, subtype) in enumerate(expected):
        info, buf = m.session.region_info(m.fd, index, 64)
        assert (info.size, info.flags, info.offset) == (size, flags, index << 10)
        caps = uapi.parse_chain(buf, info.cap_offset, "region") if info.cap_offset else []
        assert caps == ([uapi.RegionTypeCap(uapi.VFIO_REGION_TYPE_CCW, subtype)] if subtype else [])


def test_a_short_argsz_gets_the_size_the_capability_needs(m):
    info, _ = m.session.region_info(m.fd, 1)
    assert info.argsz == uapi.vfio_region_info.size + uapi.vfio_region_info_cap_type.size
    assert info.cap_offset == 0 and info.flags & uapi.VFIO_REGION_INFO_FLAG_CAPS


def test_the_io_region_leaves_cap_offset_as_it_came(m):
    buf = uapi.vfio_region_info.pack(index=0, cap_offset=0x77)
    m.k.ioctl(m.fd, uapi.VFIO_DEVICE_GET_REGION_INFO, buf)
    assert uapi.vfio_region_info.unpack(buf).cap_offset == 0x77


def test_region_and_irq_indexes_past_the_end_are_einval(m):
    assert errno_of(m.session.region_info, m.fd, 4) == errno.EINVAL
    assert errno_of(m.session.irq_info, m.fd, uapi.VFIO_CCW_NUM_IRQS) == errno.EINVAL
    infos = [m.session.irq_info(m.fd, i) for i in range(uapi.VFIO_CCW_NUM_IRQS)]
    assert [(i.flags, i.count) for i in infos] == [(uapi.VFIO_IRQ_INFO_EVENTFD, 1)] * 3


def test_an_mdev_with_only_the_io_region(k):
    dev = Mdev(k, "0.0.0314")
    assert dev.session.region_info(dev.fd, 0)[0].size == uapi.ccw_io_region.size
    assert errno_of(dev.session.region_info, dev.fd, 1) == errno.EINVAL
    assert dev.command(uapi.VFIO_CCW_ASYNC_CMD_HSCH) == errno.EINVAL
    dev.close()


def test_nothing_can_be_mmapped(m):
    assert errno_of(m.k.mmap, m.fd, 4096, 0) == errno.EINVAL


# -- SET_IRQS ---------------------------------------------------------------------------------
def test_set_irqs_takes_trigger_only_and_one_vector(m):
    none = uapi.VFIO_IRQ_SET_DATA_NONE
    assert errno_of(m.k.ioctl, m.fd, uapi.VFIO_DEVICE_SET_IRQS,
                    irq.data_none(0, 0, 1, none | uapi.VFIO_IRQ_SET_ACTION_MASK)) == errno.EINVAL
    assert errno_of(m.k.ioctl, m.fd, uapi.VFIO_DEVICE_SET_IRQS,
                    irq.data_none(0, 1, 1, uapi.VFIO_IRQ_SET_ACTION_TRIGGER)) == errno.EINVAL
    assert errno_of(m.k.ioctl, m.fd, uapi.VFIO_DEVICE_SET_IRQS,
                    irq.data_none(3, 0, 1, uapi.VFIO_IRQ_SET_ACTION_TRIGGER)) == errno.EINVAL
    assert errno_of(m.k.ioctl, m.fd, uapi.VFIO_DEVICE_SET_IRQS, irq.eventfds(1, 0, [-2])) == errno.EINVAL
    assert errno_of(m.k.ioctl, m.fd, uapi.VFIO_DEVICE_SET_IRQS, irq.eventfds(1, 0, [9999])) == errno.EBADF


def test_loopback_signals_the_trigger_and_fd_minus_1_unwires_it(m):
    m.k.ioctl(m.fd, uapi.VFIO_DEVICE_SET_IRQS, irq.data_none(0, 0, 1, uapi.VFIO_IRQ_SET_ACTION_TRIGGER))
    assert m.signalled(m.io_eventfd) == 1
    m.k.ioctl(m.fd, uapi.VFIO_DEVICE_SET_IRQS, irq.data_bool(0, 0, [False], uapi.VFIO_IRQ_SET_ACTION_TRIGGER))
    assert m.signalled(m.io_eventfd) == 0
    m.k.ioctl(m.fd, uapi.VFIO_DEVICE_SET_IRQS, irq.eventfds(0, 0, [-1]))
    assert m.fake.irqs[0].trigger is None and m.fake.set_irqs_log[-1] == (0, TRIGGER_EVENTFD, 0, 1)


def test_closing_the_device_keeps_its_triggers_until_the_driver_goes(k):
    dev = Mdev(k)
    fake = k.ccw_device(SCH)
    dev.close()
    assert fake.irqs[0].trigger is not None and fake.regions == []
    fake.release()
    assert fake.irqs[0].trigger is None


# -- regions ----------------------------------------------------------------------------------
def test_every_region_bounds_its_access_by_its_struct(m):
    assert errno_of(m.k.pread, m.fd, uapi.ccw_io_region.size + 1, IO) == errno.EINVAL
    assert len(m.k.pread(m.fd, 4, IO + 120)) == 4
    assert errno_of(m.k.pread, m.fd, 8, IO + 120) == errno.EINVAL
    assert errno_of(m.k.pread, m.fd, SCHIB.SIZE + 1, SCHIB_REGION) == errno.EINVAL
    assert errno_of(m.k.pread, m.fd, 4, 4 << 10) == errno.EINVAL


def test_the_schib_and_crw_regions_are_read_only(m):
    assert errno_of(m.k.pwrite, m.fd, bytes(8), SCHIB_REGION) == errno.EINVAL
    assert errno_of(m.k.pwrite, m.fd, bytes(8), CRW_REGION) == errno.EINVAL


def test_the_schib_region_is_a_store_subchannel(m):
    schib = SCHIB.unpack(m.k.pread(m.fd, SCHIB.SIZE, SCHIB_REGION))
    pmcw = schib.pmcw
    assert (pmcw.devno, pmcw.pim, pmcw.pam, pmcw.pom, pmcw.chpid[0]) == (0xE000, 0x80, 0x80, 0xFF, 0x11)
    assert pmcw.flags & css.PMCW_FLAGS_MASK_ENA and pmcw.isc == 3 and pmcw.chars & css.PMCW_CHARS_MASK_CSENSE
    m.fake.subchannel.operational = False
    assert errno_of(m.k.pread, m.fd, SCHIB.SIZE, SCHIB_REGION) == errno.ENODEV


# -- the state machine and the channel program ------------------------------------------------
def test_a_started_program_ends_in_an_irb_and_the_io_eventfd(m):
    m.mem[DATA:DATA + 4] = b"data"
    m.program(CCW1(css.CCW_CMD_WRITE, 0, 4, IOVA + DATA))
    assert m.request() == 0 and m.fake.state is State.IDLE
    irb = m.irb()
    assert (irb.scsw.ctrl, irb.scsw.dstat, irb.scsw.cpa) == (START | ccw_subchannel.ENDED, CE_DE, IOVA + PROGRAM + 8)
    assert irb.scsw.flags == css.SCSW_FLAGS_MASK_FMT and m.fake.model.store[:4] == b"data"
    assert irb.esw == (ccw_subchannel.ESW_LPUM, 0, 0, 0, 0)


def test_a_format_0_program_runs_too(m):
    m.mem[DATA:DATA + 2] = b"f0"
    m.program(CCW0(css.CCW_CMD_WRITE, (IOVA + DATA) >> 16, (IOVA + DATA) & 0xFFFF, 0, 0, 2))
    assert m.request(ORB(0, css.ORB_CTRL0_MASK_PFCH, 0, 0, IOVA + PROGRAM)) == 0
    assert m.irb().scsw.dstat == CE_DE and m.fake.model.store[:2] == b"f0"


def test_a_program_in_unmapped_memory_is_einval(m):
    assert m.request(ORB(0, FMT_PFCH, 0, 0, IOVA + SIZE)) == errno.EINVAL
    assert m.ret_code() == -errno.EINVAL and m.fake.state is State.IDLE and not m.signalled(m.io_eventfd)


def test_data_in_read_only_memory_cannot_be_pinned(k):
    dev = Mdev(k, readonly=True)
    dev.program(CCW1(css.CCW_CMD_WRITE, 0, 4, IOVA + DATA))
    assert dev.request() == errno.EPERM
    dev.close()


def test_transport_mode_and_halt_or_clear_in_the_io_region_are_not_supported(m):
    assert m.request(ORB(0, FMT_PFCH | css.ORB_CTRL0_MASK_INVALID, 0, 0, IOVA + PROGRAM)) == errno.EOPNOTSUPP
    assert m.request(ctrl=css.SCSW_FCTL_HALT_FUNC) == errno.EOPNOTSUPP
    assert m.request(ctrl=css.SCSW_FCTL_CLEAR_FUNC) == errno.EOPNOTSUPP


def test_a_write_with_no_function_leaves_the_ret_code_it_brought(m):
    """vfio_ccw returns a non-zero ret_code as it is: negative an errno, positive a byte count."""
    region = bytearray(uapi.ccw_io_region.size)
    RET_CODE.pack_into(region, 120, -errno.E2BIG)
    assert errno_of(m.k.pwrite, m.fd, bytes(region), IO) == errno.E2BIG
    RET_CODE.pack_into(region, 120, 7)
    assert m.k.pwrite(m.fd, bytes(region), IO) == 7 and m.fake.requests == []


def test_a_held_program_keeps_the_driver_busy_until_it_ends(m):
    m.fake.subchannel.hold = True
    m.program(CCW1(css.CCW_CMD_NOOP, 0, 0, 0))
    assert m.request() == 0 and m.fake.state is State.CP_PENDING
    assert m.request() == errno.EBUSY
    m.fake.subchannel.finish()
    assert m.fake.state is State.IDLE and m.irb().scsw.dstat == CE_DE


def test_halt_ends_a_held_program_and_clear_always_works(m):
    m.fake.subchannel.hold = True
    m.program(CCW1(css.CCW_CMD_NOOP, 0, 0, 0))
    m.request()
    assert m.command(uapi.VFIO_CCW_ASYNC_CMD_HSCH) == 0 and m.fake.state is State.IDLE
    # css_do_hsch takes the start function off; the start stays pending in the activity control.
    assert m.irb().scsw.ctrl == css.SCSW_FCTL_HALT_FUNC | css.SCSW_ACTL_START_PEND | css.SCSW_STCTL_STATUS_PEND
    assert m.command(uapi.VFIO_CCW_ASYNC_CMD_CSCH) == 0
    assert m.irb().scsw.ctrl == css.SCSW_FCTL_CLEAR_FUNC | css.SCSW_STCTL_STATUS_PEND
    assert m.command(0x80) == errno.EINVAL and m.fake.subchannel.programs == 0


def test_a_subchannel_gone_is_enodev_everywhere(m):
    m.fake.subchannel.operational = False
    m.program(CCW1(css.CCW_CMD_NOOP, 0, 0, 0))
    assert m.request() == errno.ENODEV
    assert m.command(uapi.VFIO_CCW_ASYNC_CMD_HSCH) == errno.ENODEV
    assert m.command(uapi.VFIO_CCW_ASYNC_CMD_CSCH) == errno.ENODEV


def test_a_path_gone_with_another_left_is_eacces():
    with two_paths() as k:
        dev = Mdev(k)
        dev.program(CCW1(css.CCW_CMD_NOOP, 0, 0, 0))
        dev.fake.subchannel.schib.pmcw.pam = 0x80
        assert dev.request(ORB(0, FMT_PFCH, 0x40, 0, IOVA + PROGRAM)) == errno.EACCES
        assert dev.fake.lpm == 0x80
        assert dev.request(ORB(0, FMT_PFCH, 0x80, 0, IOVA + PROGRAM)) == 0
        assert dev.irb().scsw.dstat == CE_DE
        dev.fake.subchannel.schib.pmcw.pam = 0
        assert dev.request(ORB(0, FMT_PFCH, 0, 0, IOVA + PROGRAM)) == errno.ENODEV and dev.fake.lpm == 0
        dev.close()


# -- the device behind the subchannel ---------------------------------------------------------
def test_reading_past_the_end_is_an_equipment_check(m):
    first = ccw_block.CAPACITY - 0x1000
    m.program(CCW1(css.CCW_CMD_READ, css.CCW_FLAG_CC, first, IOVA + DATA),
              CCW1(css.CCW_CMD_READ, 0, 0x1001, IOVA + DATA))
    assert m.request() == 0
    irb = m.irb()
    assert irb.scsw.dstat == css.SCSW_DSTAT_UNIT_CHECK and irb.scsw.ctrl & css.SCSW_STCTL_ALERT
    assert irb.scsw.cpa == IOVA + PROGRAM + 16 and irb.ecw[0] == ccw_block.SENSE_EQUIPMENT_CHECK


def test_a_rejected_command_is_a_unit_check_with_concurrent_sense(m):
    m.program(CCW1(0x17, 0, 4, IOVA + DATA))
    m.request()
    irb = m.irb()
    assert irb.scsw.dstat == css.SCSW_DSTAT_UNIT_CHECK and irb.scsw.cpa == IOVA + PROGRAM + 8
    assert irb.scsw.flags & css.SCSW_FLAGS_MASK_ESWF and irb.ecw[0] == ccw_subchannel.SENSE_CMD_REJECT
    # build_irb_virtual's ERW: concurrent sense, and the sense size where QEMU puts it.
    assert irb.esw[:2] == (ccw_subchannel.ESW_LPUM, css.ERW_CONS | css.SENSE_DATA_SIZE << 8)


def test_without_concurrent_sense_the_guest_asks_with_basic_sense(m):
    m.fake.subchannel.schib.pmcw.chars = 0
    m.program(CCW1(0x17, 0, 4, IOVA + DATA))
    m.request()
    assert not any(m.irb().ecw)
    m.program(CCW1(css.CCW_CMD_BASIC_SENSE, 0, css.SENSE_DATA_SIZE, IOVA + DATA))
    m.request()
    assert m.irb().scsw.dstat == CE_DE and m.mem[DATA] == ccw_subchannel.SENSE_CMD_REJECT


@pytest.mark.parametrize("ccws", [
    [CCW1(css.CCW_CMD_TIC, 0, 0, IOVA + PROGRAM + 8), CCW1(css.CCW_CMD_TIC, 0, 0, IOVA + PROGRAM)],
    [CCW1(css.CCW_CMD_NOOP, css.CCW_FLAG_CC, 0, 0), CCW1(css.CCW_CMD_TIC, 0, 0, IOVA + PROGRAM)],
    [CCW1(0x10, 0, 0, 0)],
    [CCW1(css.CCW_CMD_NOOP, css.CCW_FLAG_MIDA, 0, 0)],
], ids=["tic-to-tic", "endless-loop", "invalid-command", "mida"])
def test_programs_the_channel_refuses_end_in_a_program_check(m, ccws):
    m.program(*ccws)
    assert m.request() == 0
    irb = m.irb()
    assert irb.scsw.cstat == css.SCSW_CSTAT_PROG_CHECK and irb.scsw.ctrl & css.SCSW_STCTL_ALERT


def test_chained_writes_advance_through_the_store(m):
    m.mem[DATA:DATA + 6] = b"abcdef"
    m.program(CCW1(css.CCW_CMD_WRITE, css.CCW_FLAG_CC, 3, IOVA + DATA), CCW1(css.CCW_CMD_WRITE, 0, 3, IOVA + DATA + 3))
    m.request()
    assert m.irb().scsw.cpa == IOVA + PROGRAM + 16 and m.fake.model.store[:6] == b"abcdef"


# -- channel paths and CRWs -------------------------------------------------------------------
def test_crws_come_one_per_read_and_the_eventfd_again_while_more_wait(m):
    crw_eventfd = m.wire(uapi.VFIO_CCW_CRW_IRQ_INDEX)
    assert m.k.pread(m.fd, 8, CRW_REGION) == bytes(8)
    m.fake.chp_event(0x11, ChpEvent.OFFLINE)
    m.fake.chp_event(0x11, ChpEvent.ONLINE)
    assert m.signalled(crw_eventfd) == 2
    first = CRW.unpack(m.k.pread(m.fd, 8, CRW_REGION))
    assert (first.rsc, first.erc, first.rsid) == (css.CRW_RSC_CHP, css.CRW_ERC_PERRN, 0x11)
    assert m.signalled(crw_eventfd) == 1
    assert CRW.unpack(m.k.pread(m.fd, 8, CRW_REGION)).erc == css.CRW_ERC_INIT
    assert m.signalled(crw_eventfd) == 0 and m.k.pread(m.fd, 8, CRW_REGION) == bytes(8)


def test_varying_a_path_changes_only_the_logical_mask(m):
    pmcw = m.fake.subchannel.schib.pmcw
    assert m.fake.chp_event(0x11, ChpEvent.VARY_OFF) == 0 and (m.fake.lpm, pmcw.pam) == (0, 0x80)
    assert m.fake.chp_event(0x11, ChpEvent.VARY_ON) == 0 and m.fake.lpm == 0x80
    assert not m.fake.crws and m.fake.chp_event(0x42, ChpEvent.OFFLINE) == 0 and pmcw.pam == 0x80
    m.fake.subchannel.operational = False
    assert m.fake.chp_event(0x11, ChpEvent.OFFLINE) == -errno.ENODEV


# -- reset and failure injection --------------------------------------------------------------
def test_reset_closes_and_reopens_and_fails_once_not_operational(m):
    m.k.ioctl(m.fd, uapi.VFIO_DEVICE_RESET, 0)
    assert m.fake.resets == 1 and m.fake.state is State.IDLE
    m.fake.subchannel.operational = False
    assert errno_of(m.k.ioctl, m.fd, uapi.VFIO_DEVICE_RESET, 0) == errno.EINVAL
    assert m.fake.state is State.NOT_OPER
    m.program(CCW1(css.CCW_CMD_NOOP, 0, 0, 0))
    assert m.request() == errno.EIO and m.command(uapi.VFIO_CCW_ASYNC_CMD_CSCH) == errno.EIO


def test_planned_answers_are_used_once_in_order(m):
    m.program(CCW1(css.CCW_CMD_NOOP, 0, 0, 0))
    m.fake.plan("io-write", errno=errno.EAGAIN)
    m.fake.plan("io-write", ret_code=-errno.EBUSY)
    m.fake.plan("io-write", count=10)
    assert [m.request(), m.request(), m.request(), m.request()] == [errno.EAGAIN, errno.EBUSY, 0, 0]
    assert m.ret_code() == 0 and len(m.fake.requests) == 1
    m.fake.plan("io-read", count=24)
    m.fake.plan("schib-read", errno=errno.EFAULT)
    assert len(m.k.pread(m.fd, uapi.ccw_io_region.size, IO)) == 24
    assert errno_of(m.k.pread, m.fd, SCHIB.SIZE, SCHIB_REGION) == errno.EFAULT
    m.fake.plan("async-write", ret_code=-errno.EACCES)
    assert m.command(uapi.VFIO_CCW_ASYNC_CMD_HSCH) == errno.EACCES
    with pytest.raises(ValueError):
        m.fake.plan("config-read")


# -- the IOMMU's pin --------------------------------------------------------------------------
def test_pinning_asks_the_mapping_for_its_permissions(k):
    dev = Mdev(k, readonly=True)
    iommu = k.groups[30].container.iommu
    assert iommu.pin(IOVA, 8, write=False) == 0
    assert iommu.pin(IOVA, 8, write=True) == errno.EPERM
    assert iommu.pin(IOVA + SIZE - 4, 8, write=False) == errno.EINVAL
    assert iommu.faults == []
    dev.close()


# -- IDALs ------------------------------------------------------------------------------------
def test_an_idal_needs_64_bit_idaws_of_4k(m):
    m.program(CCW1(css.CCW_CMD_WRITE, css.CCW_FLAG_IDA, 4, IOVA + DATA))
    assert m.request() == errno.EOPNOTSUPP
    c64 = FMT_PFCH | css.ORB_CTRL0_MASK_C64
    assert m.request(ORB(0, c64 | css.ORB_CTRL0_MASK_I2K, 0, 0, IOVA + PROGRAM)) == errno.EOPNOTSUPP


def test_an_idal_moves_data_through_the_pages_it_lists(m):
    """Two IDAWs: the block's first half at the end of one page, the second at another page."""
    first, second = IOVA + 0x3000 - 3, IOVA + 0x5000
    m.mem[first - IOVA:first - IOVA + 3] = b"abc"
    m.mem[second - IOVA:second - IOVA + 3] = b"def"
    m.mem[DATA:DATA + 16] = first.to_bytes(8, "big") + second.to_bytes(8, "big")
    m.program(CCW1(css.CCW_CMD_WRITE, css.CCW_FLAG_IDA, 6, IOVA + DATA))
    assert m.request(ORB(0, FMT_PFCH | css.ORB_CTRL0_MASK_C64, 0, 0, IOVA + PROGRAM)) == 0
    assert m.irb().scsw.dstat == CE_DE and m.fake.model.store[:6] == b"abcdef"


# -- the CI guest's virtio-blk-ccw ------------------------------------------------------------
@pytest.fixture
def guest(k):
    dev = Mdev(k, "0.0.0001")
    yield dev
    dev.close()


def test_the_guest_subchannel_in_sysfs(k):
    sch = "/sys/bus/css/devices/0.0.0001"
    assert (k.read_text(f"{sch}/chpids"), k.read_text(f"{sch}/pimpampom")) == ("00 " * 8 + "\n", "80 80 ff\n")
    assert k.read_text("/sys/devices/css0/chp0.00/type") == "32\n" and k.read_text(f"{sch}/dev_busid") == "0.0.0001\n"
    mdev = f"/sys/bus/mdev/devices/{GUEST_MDEV_UUID}"
    assert k.readlink(f"{mdev}/mdev_type") == "../mdev_supported_types/vfio_ccw-io"
    assert k.read_text(f"{sch}/mdev_supported_types/vfio_ccw-io/device_api") == "vfio-ccw\n"
    assert k.readlink(f"{mdev}/iommu_group").endswith("/iommu_groups/0") and not k.exists(f"{sch}/0.0.0001")


def test_the_guest_schib_is_the_one_it_showed(guest):
    """00e0a2a0 18810001 80000080 0000ff80: ISC 3, enabled, devno 0001, one path, chpid 00."""
    pmcw = SCHIB.unpack(guest.k.pread(guest.fd, SCHIB.SIZE, SCHIB_REGION)).pmcw
    assert (pmcw.flags, pmcw.devno, pmcw.lpm, pmcw.pnom, pmcw.lpum, pmcw.pim) == (0x1881, 1, 0x80, 0, 0, 0x80)
    assert (pmcw.mbi, pmcw.pom, pmcw.pam, pmcw.chpid) == (0, 0xFF, 0x80, bytes(8))


def run(dev: Mdev, *ccws, ctrl0: int = FMT_PFCH | css.ORB_CTRL0_MASK_C64) -> IRB:
    dev.program(*ccws)
    assert dev.request(ORB(0, ctrl0, 0x80, 0, IOVA + PROGRAM)) == 0
    return dev.irb()


def test_sense_id_names_virtio_ccw_and_the_block_device(guest):
    irb = run(guest, CCW1(css.CCW_CMD_SENSE_ID, css.CCW_FLAG_SLI, 0x100, IOVA + DATA))
    assert (irb.scsw.flags, irb.scsw.ctrl, irb.scsw.cpa, irb.scsw.dstat, irb.scsw.count) == \
        (0x0080, 0x4007, IOVA + PROGRAM + 8, CE_DE, 0)
    assert guest.mem[DATA:DATA + 8] == bytes.fromhex("ff38320200000000")


def test_a_chained_program_reads_the_capacity_big_endian(guest):
    guest.program(CCW1(css.CCW_CMD_NOOP, css.CCW_FLAG_CC, 0, 0), CCW1(css.CCW_CMD_TIC, 0, 0, IOVA + 0x200))
    guest.mem[0x200:0x208] = CCW1(css.CCW_CMD_READ_CONF, 0, 8, IOVA + DATA).pack()
    assert guest.request(ORB(0, FMT_PFCH, 0x80, 0, IOVA + PROGRAM)) == 0
    irb = guest.irb()
    assert (irb.scsw.dstat, irb.scsw.cpa) == (CE_DE, IOVA + 0x208)
    assert guest.mem[DATA:DATA + 8] == (ccw_virtio.DISK_SIZE // 512).to_bytes(8, "big")


def test_after_a_clear_the_irb_keeps_the_kernels_address(guest):
    """The program is freed once it ends, so nothing translates the address the clear reports."""
    run(guest, CCW1(css.CCW_CMD_NOOP, 0, 0, 0))
    assert guest.command(uapi.VFIO_CCW_ASYNC_CMD_CSCH) == 0
    irb = guest.irb()
    assert (irb.scsw.flags, irb.scsw.ctrl) == (0x0080, css.SCSW_FCTL_CLEAR_FUNC | css.SCSW_STCTL_STATUS_PEND)
    assert not IOVA <= irb.scsw.cpa < IOVA + SIZE and irb.scsw.cpa & 7 == 0 and irb.scsw.cpa < 1 << 31
    schib = SCHIB.unpack(guest.k.pread(guest.fd, SCHIB.SIZE, SCHIB_REGION))
    assert schib.scsw.cpa == irb.scsw.cpa and schib.pmcw.lpum == 0x80


def test_read_feat_gives_the_legacy_bits_of_index_0_only(guest):
    guest.mem[DATA + 4] = 0
    irb = run(guest, CCW1(css.CCW_CMD_READ_FEAT, css.CCW_FLAG_SLI, 8, IOVA + DATA))
    assert irb.scsw.dstat == CE_DE and irb.scsw.count == 3
    assert int.from_bytes(guest.mem[DATA:DATA + 4], "little") == ccw_virtio.FEATURES_0_31
    guest.mem[DATA + 4] = 1
    run(guest, CCW1(css.CCW_CMD_READ_FEAT, 0, 5, IOVA + DATA))
    assert guest.mem[DATA:DATA + 4] == bytes(4)


@pytest.mark.parametrize("ccw, cstat, dstat", [
    (CCW1(css.CCW_CMD_WRITE, 0, 8, IOVA + DATA), 0, css.SCSW_DSTAT_UNIT_CHECK),
    (CCW1(css.CCW_CMD_READ, 0, 8, IOVA + DATA), 0, css.SCSW_DSTAT_UNIT_CHECK),
    (CCW1(css.CCW_CMD_SENSE_ID, 0, 8, IOVA + DATA), css.SCSW_CSTAT_PROG_CHECK, 0),
    (CCW1(css.CCW_CMD_READ_CONF, 0, 0x100, IOVA + DATA), css.SCSW_CSTAT_PROG_CHECK, 0),
    (CCW1(css.CCW_CMD_READ_FEAT, 0, 8, IOVA + DATA), css.SCSW_CSTAT_PROG_CHECK, 0),
], ids=["write", "read", "sense-id-short", "read-conf-long", "read-feat-long"])
def test_what_virtio_ccw_refuses(guest, ccw, cstat, dstat):
    irb = run(guest, ccw)
    assert (irb.scsw.cstat, irb.scsw.dstat) == (cstat, dstat) and irb.scsw.ctrl & css.SCSW_STCTL_ALERT


def test_type1_without_a_domain(guest):
    """The mdev's group is an emulated one: no IOMMU domain, so PAGE_MASK page sizes, no IOVA
    ranges, no vaddr updates, coherent DMA, and nothing pinned at map time."""
    buf = bytearray(256)
    uapi.vfio_iommu_type1_info.pack_into(buf, 0, argsz=256)
    guest.k.ioctl(guest.container, uapi.VFIO_IOMMU_GET_INFO, buf)
    info = uapi.vfio_iommu_type1_info.unpack(buf)
    assert (info.flags, info.iova_pgsizes) == (3, 0xFFFFFFFFFFFFF000)
    caps = uapi.parse_chain(buf, info.cap_offset, "iommu")
    assert not [c for c in caps if isinstance(c, uapi.IovaRangeCap)] and len(caps) == 2
    check = lambda ext: guest.k.ioctl(guest.container, uapi.VFIO_CHECK_EXTENSION, ext)
    assert (check(uapi.VFIO_UPDATE_VADDR), check(uapi.VFIO_DMA_CC_IOMMU)) == (0, 1)
    guest.k.ioctl(guest.container, uapi.VFIO_IOMMU_MAP_DMA, uapi.vfio_iommu_type1_dma_map.pack(
        flags=3, vaddr=0x1000, iova=1 << 40, size=0x1000))
