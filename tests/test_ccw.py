"""The css model the vfio-ccw flavour plugs into, with no kernel below it: the s390 formats held to
the region sizes of <linux/vfio_ccw.h>, realpath through a Host, guest subchannels and their
instructions, the emulated halt and clear, the I/O interrupt and CRW queues, and the search for a
region by its type."""

import errno

import pytest

from fakekernel import FakeKernel
from vfio_impl import uapi
from vfio_impl.core.container import AddressSpace, Group
from vfio_impl.core.device import Device
from vfio_impl.core.trace import TraceRecorder
from vfio_impl.flavours.ccw import realpath
from vfio_impl.uapi import css
from vfio_impl.uapi.css import CCW0, CCW1, CRW, IRB, ORB, PMCW, SCHIB, SCSW
from vfio_impl.vmm.css import ChannelSubsystem, CssDevId, IOInstEnding, SubchDev, sch_gen_unit_exception

ENABLED = css.PMCW_FLAGS_MASK_DNV | css.PMCW_FLAGS_MASK_ENA


class Driver:
    """A subchannel driver that records its calls and answers what it was told to."""

    def __init__(self, request=IOInstEnding.CC_EXPECTED, halt=0, clear=0):
        self.answers = {"handle_request": request, "handle_halt": halt, "handle_clear": clear,
                        "handle_store": IOInstEnding.CC_EXPECTED}
        self.calls: list[str] = []

    def __getattr__(self, name):
        if name not in self.answers:
            raise AttributeError(name)
        return lambda: self.calls.append(name) or self.answers[name]


@pytest.fixture
def sch():
    sch = ChannelSubsystem().create_sch()
    sch.curr_status.pmcw.flags = ENABLED
    return sch


# -- formats ----------------------------------------------------------------------------------
def test_the_formats_fill_their_areas_of_the_io_region_exactly():
    assert ORB.STRUCT.size == uapi.ORB_AREA_SIZE
    assert SCSW.STRUCT.size == uapi.SCSW_AREA_SIZE
    assert IRB.SIZE == len(IRB().pack()) == uapi.IRB_AREA_SIZE
    assert SCHIB.SIZE == len(SCHIB().pack()) == uapi.SCHIB_AREA_SIZE
    assert CRW.STRUCT.size == uapi.ccw_crw_region.offsetof("pad")
    assert PMCW.STRUCT.size + SCSW.STRUCT.size + 12 == SCHIB.SIZE
    layout = uapi.ccw_io_region
    assert (layout.offsetof("scsw_area"), layout.offsetof("irb_area")) == (ORB.STRUCT.size, 2 * SCSW.STRUCT.size)


def test_formats_are_big_endian_and_round_trip():
    assert ORB(0x01020304, 0x0506, 7, 8, 0x090A0B0C).pack() == bytes(range(1, 13))
    irb = IRB(SCSW(1, 2, 3, 4, 5, 6), (1, 2, 3, 4, 5), bytes(range(32)), bytes(32))
    assert IRB.unpack(b"xx" + irb.pack(), 2) == irb
    schib = SCHIB(PMCW(devno=0xE000, chpid=bytes(range(8)), chars=1), SCSW(ctrl=0x4007), 5, b"abcd")
    assert SCHIB.unpack(schib.pack()) == schib


def test_a_format_0_ccw_is_a_format_1_ccw_with_a_24_bit_address():
    ccw0 = CCW0(css.CCW_CMD_READ, 0x12, 0x3456, css.CCW_FLAG_CC, 0, 80)
    assert ccw0.to_ccw1() == CCW1(css.CCW_CMD_READ, css.CCW_FLAG_CC, 80, 0x123456)


def test_a_crw_is_built_from_its_fields():
    crw = CRW.build(css.CRW_RSC_CHP, css.CRW_ERC_PERRN, 0x11, solicited=True, chained=True)
    assert (crw.rsc, crw.erc, crw.rsid) == (css.CRW_RSC_CHP, css.CRW_ERC_PERRN, 0x11)
    assert crw.flags & css.CRW_FLAGS_MASK_S and crw.flags & css.CRW_FLAGS_MASK_C
    assert crw.pack() == bytes([0x54, 0x06, 0x00, 0x11])


# -- realpath ---------------------------------------------------------------------------------
def test_realpath_follows_every_link_on_the_way():
    with FakeKernel("ccw") as k:
        uuid = "8a1c0bd0-7e7a-4f6a-9c3e-000000000313"
        assert realpath(k, f"/sys/bus/mdev/devices/{uuid}") == f"/sys/devices/css0/0.0.0313/{uuid}"
        assert realpath(k, f"/sys/bus/css/devices/0.0.0313/{uuid}/iommu_group/") == "/sys/kernel/iommu_groups/30"
        assert realpath(k, "/sys/bus/css/devices/../devices/./0.0.0314") == "/sys/devices/css0/0.0.0314"
        with pytest.raises(OSError) as e:
            realpath(k, "/sys/bus/css/devices/0.0.0999/x")
        assert e.value.errno == errno.ENOENT
        k.fs.create_symlink("/tmp/loop", "/tmp/loop")
        with pytest.raises(OSError) as e:
            realpath(k, "/tmp/loop")
        assert e.value.errno == errno.ELOOP


# -- the channel subsystem --------------------------------------------------------------------
def test_subchannels_take_the_first_free_number_in_the_virtual_css():
    channel_subsystem = ChannelSubsystem()
    first, second = channel_subsystem.create_sch(), channel_subsystem.create_sch()
    assert [(s.cssid, s.ssid, s.schid, s.devno) for s in (first, second)] == [(0xFE, 0, 0, 0), (0xFE, 0, 1, 1)]
    channel_subsystem.subch_release(first)
    assert channel_subsystem.create_sch().schid == 0 and str(CssDevId(0, 0, 0x313)) == "0.0.0313"


def test_an_io_interrupt_carries_the_subchannel_id_parameter_and_isc(sch):
    sch.curr_status.pmcw.flags |= 5 << 11
    sch.curr_status.pmcw.intparm = 0xABCD
    with TraceRecorder() as rec:
        sch.css.inject_io_interrupt(sch)
    interrupt = sch.css.io_interrupts[-1]
    assert (interrupt.subchannel_id, interrupt.subchannel_nr, interrupt.io_int_parm) == (0xFE09, 0, 0xABCD)
    assert interrupt.isc == 5 and rec.named("css_io_interrupt")[0]["isc"] == 5


def test_crws_raise_one_machine_check_until_the_guest_empties_the_queue():
    channel_subsystem = ChannelSubsystem()
    for rsid in (1, 2):
        channel_subsystem.crw_add_to_queue(CRW.build(css.CRW_RSC_CHP, css.CRW_ERC_INIT, rsid))
    assert channel_subsystem.crw_mchks == 1
    assert [channel_subsystem.stcrw().rsid for _ in range(2)] == [1, 2]
    assert channel_subsystem.stcrw() is None and channel_subsystem.do_crw_mchk
    channel_subsystem.crw_add_to_queue(CRW.build(css.CRW_RSC_CHP, css.CRW_ERC_INIT, 3))
    assert channel_subsystem.crw_mchks == 2


def test_the_schib_needs_every_sysfs_file_to_parse():
    with FakeKernel("ccw") as k:
        channel_subsystem = ChannelSubsystem()
        sch = channel_subsystem.create_sch()
        assert channel_subsystem.sch_build_schib(sch, CssDevId(0, 0, 0x313), k) == 0
        k.fs.remove_object("/sys/devices/css0/0.0.0313/pimpampom")
        k.fs.create_file("/sys/devices/css0/0.0.0313/pimpampom", contents="80 zz\n")
        assert channel_subsystem.sch_build_schib(sch, CssDevId(0, 0, 0x313), k) == -errno.EINVAL
        k.fs.remove_object("/sys/devices/css0/chp0.11/type")
        with TraceRecorder() as rec:
            # A channel path the css already knows is not read again.
            assert channel_subsystem.sch_build_schib(sch, CssDevId(0, 0, 0x314), k) == 0
            assert ChannelSubsystem().sch_build_schib(sch, CssDevId(0, 0, 0x314), k) == -errno.EINVAL
        assert [f["message"] for f in rec.named("error")] == \
            ["css_sch_get_chpid_type: open /sys/devices/css0/chp0.11/type failed"]


# -- the instructions -------------------------------------------------------------------------
def test_modify_subchannel_takes_only_what_the_guest_may_set(sch):
    schib = SCHIB(PMCW(intparm=7, flags=0xFFFF, devno=0x9999, lpm=0x80, chars=0xFFFFFFFF))
    assert sch.msch(schib) is IOInstEnding.CC_EXPECTED
    pmcw = sch.curr_status.pmcw
    assert (pmcw.intparm, pmcw.devno, pmcw.lpm) == (7, 0, 0x80)
    assert pmcw.flags == 0x3800 | 0x80 | 0x60 | 0x18 | 0x4 | css.PMCW_FLAGS_MASK_DNV
    assert pmcw.chars == css.PMCW_CHARS_MASK_MBFC | css.PMCW_CHARS_MASK_XMWME | css.PMCW_CHARS_MASK_CSENSE
    sch.curr_status.scsw.ctrl = css.SCSW_FCTL_START_FUNC
    assert sch.msch(schib) is IOInstEnding.CC_BUSY


def test_start_checks_the_subchannel_before_the_driver(sch):
    sch.driver = Driver()
    sch.curr_status.pmcw.flags = css.PMCW_FLAGS_MASK_DNV
    assert sch.ssch(ORB()) is IOInstEnding.CC_NOT_OPERATIONAL
    sch.curr_status.pmcw.flags = ENABLED
    sch.curr_status.scsw.ctrl = css.SCSW_STCTL_STATUS_PEND
    assert sch.ssch(ORB()) is IOInstEnding.CC_STATUS_PRESENT
    sch.curr_status.scsw.ctrl = css.SCSW_FCTL_HALT_FUNC
    assert sch.ssch(ORB()) is IOInstEnding.CC_BUSY
    assert sch.driver.calls == []


def test_a_start_the_driver_refuses_leaves_the_scsw_as_it_was(sch):
    sch.driver = Driver(request=IOInstEnding.CC_BUSY)
    sch.curr_status.scsw.flags = css.SCSW_FLAGS_MASK_PNO
    assert sch.ssch(ORB(intparm=9, cpa=0x1000)) is IOInstEnding.CC_BUSY
    assert (sch.scsw.ctrl, sch.scsw.flags) == (0, css.SCSW_FLAGS_MASK_PNO)
    assert sch.curr_status.pmcw.intparm == 9 and sch.channel_prog == 0x1000


def test_a_start_with_no_driver_is_status_present(sch):
    assert sch.ssch(ORB()) is IOInstEnding.CC_STATUS_PRESENT


def test_the_unit_exception_ends_the_start_at_once(sch):
    sch.channel_prog = 0x2000
    sch.curr_status.scsw.ctrl = css.SCSW_FCTL_START_FUNC | css.SCSW_ACTL_START_PEND
    sch_gen_unit_exception(sch)
    assert sch.scsw.ctrl == css.SCSW_FCTL_START_FUNC | 0x17
    assert (sch.scsw.cpa, sch.scsw.dstat) == (0x2008, css.SCSW_DSTAT_UNIT_EXCEP)


def test_a_driver_that_cannot_halt_or_clear_leaves_it_to_the_emulation(sch):
    sch.driver = Driver(halt=-errno.ENOSYS, clear=-errno.ENOSYS)
    assert sch.hsch() is IOInstEnding.CC_EXPECTED
    assert sch.scsw.ctrl == css.SCSW_FCTL_HALT_FUNC | css.SCSW_STCTL_STATUS_PEND
    assert sch.scsw.dstat == css.SCSW_DSTAT_DEVICE_END and len(sch.css.io_interrupts) == 1
    assert sch.hsch() is IOInstEnding.CC_STATUS_PRESENT
    assert sch.csch() is IOInstEnding.CC_EXPECTED
    assert sch.scsw.ctrl == css.SCSW_FCTL_CLEAR_FUNC | css.SCSW_STCTL_STATUS_PEND
    assert sch.curr_status.pmcw.lpum == 0x80 and len(sch.css.io_interrupts) == 2
    assert sch.driver.calls == ["handle_halt", "handle_clear"]


def test_a_driver_that_halts_brings_its_own_interrupt(sch):
    sch.driver = Driver()
    assert sch.hsch() is IOInstEnding.CC_EXPECTED and sch.css.io_interrupts == []
    assert sch.scsw.ctrl == css.SCSW_FCTL_HALT_FUNC | css.SCSW_ACTL_HALT_PEND
    assert sch.hsch() is IOInstEnding.CC_BUSY


def test_test_subchannel_takes_the_pending_status(sch):
    sch.curr_status.pmcw.chars = css.PMCW_CHARS_MASK_CSENSE
    assert sch.tsch()[0] == 1
    sch.curr_status.scsw = SCSW(flags=css.SCSW_FLAGS_MASK_PNO, ctrl=css.SCSW_FCTL_START_FUNC | 0x17,
                                dstat=css.SCSW_DSTAT_UNIT_CHECK)
    sch.sense_data[0] = 0x80
    cc, irb = sch.tsch()
    assert cc == 0 and irb.scsw.dstat == css.SCSW_DSTAT_UNIT_CHECK and irb.ecw[0] == 0x80
    assert (sch.scsw.ctrl, sch.scsw.flags) == (0, 0) and not any(sch.sense_data)
    sch.curr_status.pmcw.flags = css.PMCW_FLAGS_MASK_DNV
    assert sch.tsch()[0] == 3


def test_store_subchannel_asks_the_driver_first(sch):
    sch.driver = Driver()
    cc, schib = sch.stsch()
    assert cc is IOInstEnding.CC_EXPECTED and sch.driver.calls == ["handle_store"]
    assert schib == sch.curr_status and schib is not sch.curr_status


def test_a_bare_subchdev_has_the_guest_names():
    sch = SubchDev(ChannelSubsystem(), 0xFE, 1, 2, 0x1234)
    assert sch.name == "fe.1.1234" and sch.scsw is sch.curr_status.scsw


# -- finding a region by its type -------------------------------------------------------------
def test_a_region_is_found_by_its_type_capability():
    with FakeKernel("ccw") as k:
        with AddressSpace(k) as space:
            uuid = "8a1c0bd0-7e7a-4f6a-9c3e-000000000313"
            Group.get(space, 30)
            dev = Device.attach(space, f"/sys/bus/css/devices/0.0.0313/{uuid}", uuid)
            with TraceRecorder() as rec:
                info = dev.get_dev_region_info(uapi.VFIO_REGION_TYPE_CCW, uapi.VFIO_REGION_SUBTYPE_CCW_CRW)
                assert info.index == 3 and info.offset == 3 << 10
                assert dev.get_dev_region_info(uapi.VFIO_REGION_TYPE_CCW, 99) is None
            assert [f["subtype"] for f in rec.named("vfio_get_dev_region")] == [1, 2, 3, 1, 2, 3]
