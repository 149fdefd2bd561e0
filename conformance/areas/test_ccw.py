"""The vfio-ccw flavour on the fake's ccw topology: realize and each of its errors with nothing
left open, start subchannel with every ret_code and the PFCH cases, halt and clear with and
without the async command region, the I/O interrupt with every way reading the IRB can fail,
channel programs that move data through guest memory, sense data, store subchannel through the
schib region and channel reports through the CRW region."""

import errno

import pytest

from fakekernel.vfio_ccw import ChpEvent
from vfio_impl import uapi
from vfio_impl.core.container import AddressSpace
from vfio_impl.core.errors import VFIOError
from vfio_impl.core.trace import TraceRecorder
from vfio_impl.flavours.ccw import VFIOCCWDevice
from vfio_impl.uapi import css
from vfio_impl.uapi.css import CCW1, ORB, SCHIB
from vfio_impl.vmm.css import ChannelSubsystem, IOInstEnding
from vfio_impl.vmm.machine import Machine, VirtualClock

pytestmark = pytest.mark.vfio(ccw=True)

SCH = "0.0.0313"
UUID = "8a1c0bd0-7e7a-4f6a-9c3e-000000000313"
MDEV = f"/sys/bus/mdev/devices/{UUID}"
ONLY_IO = "0.0.0314"


def mdev(schid: str) -> str:
    return f"/sys/bus/mdev/devices/8a1c0bd0-7e7a-4f6a-9c3e-{int(schid[-4:], 16):012x}"


RAM, RAM_SIZE = 0x10000, 0x10000
PROGRAM, DATA, BUFFER, SENSE = 0x10100, 0x11000, 0x12000, 0x13000
FMT_PFCH = css.ORB_CTRL0_MASK_FMT | css.ORB_CTRL0_MASK_PFCH
WAIT = 2.0
ENDED = css.SCSW_STCTL_PRIMARY | css.SCSW_STCTL_SECONDARY | css.SCSW_STCTL_STATUS_PEND
CHANNEL_CHECK = ENDED | css.SCSW_STCTL_ALERT
CE_DE = css.SCSW_DSTAT_CHANNEL_END | css.SCSW_DSTAT_DEVICE_END
OTHER_ERRNO = errno.EIO


@pytest.fixture
def realize(vfio):
    """A factory: realize on a fresh machine (guest RAM at RAM) through the backend's host; what
    it realized is unrealized after the test and must have put its group and subchannel back."""
    made = []

    def realize_ccw(sysfsdev=MDEV, **options):
        machine = Machine(VirtualClock())
        space = AddressSpace(vfio.host, machine)
        machine.add_ram(RAM, RAM_SIZE)
        options.setdefault("css", ChannelSubsystem())
        made.append([space, options["css"], None])
        made[-1][2] = VFIOCCWDevice.realize(space, machine, sysfsdev=sysfsdev, **options)
        return made[-1][2]

    yield realize_ccw
    for _, _, dev in reversed(made):
        if dev:
            dev.unrealize()
    for space, channel_subsystem, _ in made:
        assert not space.groups, "the device left its group open"
        assert not channel_subsystem.subchannels, "the device left its subchannel behind"
        space.machine.close()


@pytest.fixture
def dev(realize):
    """The block device's subchannel, enabled by the guest with concurrent sense."""
    d = realize()
    enable(d)
    return d


@pytest.fixture
def fake(fake_kernel):
    return fake_kernel.ccw_device(SCH)


def realize_error(realize, fake_kernel, **options) -> VFIOError:
    """The error, after checking realize left no fd open in the kernel."""
    with pytest.raises(VFIOError) as e:
        realize(**options)
    assert fake_kernel.open_files() == {}
    return e.value


def refuse(monkeypatch, host, request, code, index=None):
    """The host refuses one ioctl (for one index) with `code`, as a kernel out of luck would."""
    real = host.ioctl

    def ioctl(fd, req, arg=0):
        if req == request and (index is None or int.from_bytes(bytes(arg[8:12]), "little") == index):
            raise OSError(code, "refused by the test")
        return real(fd, req, arg)

    monkeypatch.setattr(host, "ioctl", ioctl)


def enable(d, csense=True, isc=3, intparm=0xC0FFEE) -> None:
    schib = SCHIB()
    schib.pmcw.flags = css.PMCW_FLAGS_MASK_ENA | isc << 11
    schib.pmcw.intparm = intparm
    schib.pmcw.chars = css.PMCW_CHARS_MASK_CSENSE if csense else 0
    assert d.sch.msch(schib) is IOInstEnding.CC_EXPECTED


def memory(d):
    return d.machine.ram[0].memory


def program(d, *ccws: CCW1) -> None:
    mem, at = memory(d), PROGRAM - RAM
    for i, ccw in enumerate(ccws):
        mem[at + 8 * i:at + 8 * i + 8] = ccw.pack()


def orb(ctrl0=FMT_PFCH, intparm=0x1234, lpm=0, cpa=PROGRAM) -> ORB:
    return ORB(intparm, ctrl0, lpm, 0, cpa)


def interrupted(d, before: int) -> bool:
    return d.machine.run_until(lambda: len(d.css.io_interrupts) > before, WAIT)


def start(d, *ccws: CCW1, **orb_fields):
    """The guest starts a channel program and takes its interrupt: (cc of ssch, IRB of tsch)."""
    if ccws:
        program(d, *ccws)
    before = len(d.css.io_interrupts)
    cc = d.sch.ssch(orb(**orb_fields))
    assert cc is not IOInstEnding.CC_EXPECTED or interrupted(d, before), "no I/O interrupt came"
    return cc, d.sch.tsch()[1]


def messages(rec: TraceRecorder, kind: str) -> list[str]:
    return [f["message"] for f in rec.named(kind)]


def assert_unit_exception(d, interrupts_before: int) -> None:
    scsw = d.sch.scsw
    assert scsw.dstat == css.SCSW_DSTAT_UNIT_EXCEP
    assert scsw.ctrl & css.SCSW_CTRL_MASK_STCTL == CHANNEL_CHECK
    assert not scsw.ctrl & css.SCSW_ACTL_START_PEND
    assert len(d.css.io_interrupts) == interrupts_before + 1


# -- realize ----------------------------------------------------------------------------------
def test_realize_names_the_subchannel_and_finds_every_region(realize):
    d = realize()
    assert (d.name, d.mdevid, str(d.hostid)) == (SCH, UUID, SCH)
    assert [(r.size, r.info.offset) for r in (d.io_region, d.async_cmd_region, d.schib_region, d.crw_region)] == \
        [(uapi.ccw_io_region.size, 0), (uapi.ccw_cmd_region.size, 1 << 10),
         (uapi.ccw_schib_region.size, 2 << 10), (uapi.ccw_crw_region.size, 3 << 10)]
    assert sorted(d.notifiers) == [uapi.VFIO_CCW_IO_IRQ_INDEX, uapi.VFIO_CCW_CRW_IRQ_INDEX]
    assert all(d.machine.has_fd_handler(fd) for fd in d.notifiers.values())
    assert d.balloon_allowed and not d.needs_reset and d.migratable is False


def test_the_guest_subchannel_is_built_from_the_hosts_sysfs(realize):
    d = realize()
    pmcw = d.sch.curr_status.pmcw
    assert d.sch.name == "fe.0.0000" and pmcw.devno == 0 and pmcw.flags == css.PMCW_FLAGS_MASK_DNV
    assert (pmcw.pim, pmcw.pam, pmcw.pom, pmcw.chpid) == (0x80, 0x80, 0xFF, bytes([0x11]) + bytes(7))
    assert d.css.chpids == {0x11: 0x1B}


def test_sysfsdev_may_name_the_mdev_under_its_subchannel(realize):
    d = realize(sysfsdev=f"/sys/bus/css/devices/{SCH}/{UUID}/")
    assert d.name == SCH and d.mdevid == UUID


def test_two_devices_get_two_guest_subchannels(realize):
    shared = ChannelSubsystem()
    first, second = realize(css=shared), realize(sysfsdev=mdev(ONLY_IO), css=shared)
    assert (first.sch.name, second.sch.name) == ("fe.0.0000", "fe.0.0001")


def test_no_sysfsdev(realize, fake_kernel):
    e = realize_error(realize, fake_kernel, sysfsdev=None)
    assert e.message == "No host device provided" and e.errno == errno.EINVAL


def test_a_sysfsdev_that_does_not_exist(realize, fake_kernel):
    e = realize_error(realize, fake_kernel, sysfsdev="/sys/bus/mdev/devices/nothing")
    assert e.message == "Host device '/sys/bus/mdev/devices/nothing' not found" and e.errno == errno.ENOENT


def test_a_sysfsdev_not_under_a_subchannel(realize, fake_kernel):
    e = realize_error(realize, fake_kernel, sysfsdev="/sys/bus/css/devices/0.0.0313")
    assert e.message == "Failed to read css0"


def test_a_subchannel_without_channel_paths_has_no_schib(realize, fake_kernel):
    with TraceRecorder() as rec:
        e = realize_error(realize, fake_kernel, sysfsdev=mdev("0.0.0320"))
    assert e.message == "s390_ccw_realize: Failed to build initial schib" and e.errno == errno.EINVAL
    assert messages(rec, "error") == ["css_sch_get_chpids: open /sys/bus/css/devices/0.0.0320/chpids failed"]


@pytest.mark.parametrize("schid, message, code", [
    ("0.0.0315", "vfio: no iommu_group found", errno.ENOENT),
    ("0.0.0316", "vfio: failed to read ../../../../kernel/iommu_groups/bogus", errno.EINVAL),
    ("0.0.0317", "vfio: Um, this isn't a vfio-ccw device", errno.EINVAL),
    ("0.0.0318", "vfio: too few regions (0), expected at least 1", errno.EINVAL),
    ("0.0.0319", "vfio: Unexpected size of the I/O region", errno.EINVAL),
    ("0.0.031a", "vfio: Unexpected size of the async cmd region", errno.EINVAL),
    ("0.0.031b", "vfio: Unexpected size of the schib region", errno.EINVAL),
    ("0.0.031c", "vfio: Unexpected size of the CRW region", errno.EINVAL),
    ("0.0.031d", "vfio: unexpected number of io irqs 0", errno.EINVAL),
    ("0.0.031e", "vfio: Error getting irq info", errno.EINVAL),
], ids=["no-group", "group-not-a-number", "not-ccw", "no-regions", "io-size", "async-size", "schib-size",
        "crw-size", "no-irqs", "io-irq-without-vectors"])
def test_each_broken_mdev_fails_realize_in_qemus_words(realize, fake_kernel, schid, message, code):
    e = realize_error(realize, fake_kernel, sysfsdev=mdev(schid))
    assert (e.message, e.errno) == (message, code)


def test_a_subchannel_attached_twice(realize, fake_kernel):
    first = realize()
    with pytest.raises(VFIOError) as e:
        VFIOCCWDevice.realize(first.space, first.machine, sysfsdev=MDEV, css=first.css)
    assert e.value.message == f"vfio: subchannel {SCH} has already been attached" and e.value.errno == errno.EBUSY
    assert len(first.css.subchannels) == 1 and first.vbasedev.fd >= 0
    assert fake_kernel.open_files() == {"container": 1, "group": 1, "device": 1}


@pytest.mark.parametrize("ioctl, code, message", [
    (uapi.VFIO_DEVICE_GET_REGION_INFO, errno.EFAULT, "vfio: Error getting config info"),
    (uapi.VFIO_DEVICE_GET_IRQ_INFO, errno.EINVAL, "vfio: Error getting irq info"),
    (uapi.VFIO_DEVICE_SET_IRQS, errno.EINVAL, "vfio: failed to set signaling of irq 0.0"),
], ids=["config-region-info", "io-irq-info", "io-set-irqs"])
def test_each_refused_ioctl_fails_realize(realize, fake_kernel, monkeypatch, ioctl, code, message):
    refuse(monkeypatch, fake_kernel, ioctl, code, index=0)
    e = realize_error(realize, fake_kernel)
    assert (e.message, e.errno) == (message, code)


def test_no_eventfd_for_the_io_notifier(realize, fake_kernel, monkeypatch):
    def emfile():
        raise OSError(errno.EMFILE, "too many open files")
    monkeypatch.setattr(fake_kernel, "eventfd", emfile)
    e = realize_error(realize, fake_kernel)
    assert e.message == "vfio: Unable to init event notifier for IO" and e.errno == errno.EMFILE


def test_a_crw_region_without_its_irq_unwinds_the_io_notifier(realize, fake_kernel):
    fake = fake_kernel.ccw_device("0.0.031f")
    e = realize_error(realize, fake_kernel, sysfsdev=mdev("0.0.031f"))
    assert e.message == "vfio: IRQ 1 not available (number of irqs 1)"
    trigger_eventfd = uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_TRIGGER
    assert fake.set_irqs_log == [(0, trigger_eventfd, 0, 1), (0, trigger_eventfd, 0, 1)]
    assert fake.irqs[0].trigger is None, "the unwind did not tear the I/O trigger down"


def test_without_a_crw_region_there_is_no_crw_notifier(realize):
    d = realize(sysfsdev=mdev(ONLY_IO))
    assert d.async_cmd_region is d.schib_region is d.crw_region is None
    assert list(d.notifiers) == [uapi.VFIO_CCW_IO_IRQ_INDEX]


# -- start subchannel -------------------------------------------------------------------------
def test_a_channel_program_writes_then_reads_a_block_through_guest_memory(dev, fake):
    block = bytes(range(256)) * 2
    memory(dev)[DATA - RAM:DATA - RAM + len(block)] = block
    cc, irb = start(dev, CCW1(css.CCW_CMD_WRITE, 0, len(block), DATA))
    assert cc is IOInstEnding.CC_EXPECTED
    assert (irb.scsw.dstat, irb.scsw.cstat, irb.scsw.cpa) == (CE_DE, 0, PROGRAM + 8)
    assert irb.scsw.ctrl == css.SCSW_FCTL_START_FUNC | ENDED
    assert fake.model.store[:len(block)] == block
    cc, irb = start(dev, CCW1(css.CCW_CMD_READ, 0, len(block), BUFFER))
    assert cc is IOInstEnding.CC_EXPECTED and irb.scsw.dstat == CE_DE
    assert bytes(memory(dev)[BUFFER - RAM:BUFFER - RAM + len(block)]) == block


def test_chained_commands_and_a_tic_run_in_order(dev, fake):
    memory(dev)[DATA - RAM:DATA - RAM + 8] = b"ABCDEFGH"
    program(dev, CCW1(css.CCW_CMD_WRITE, css.CCW_FLAG_CC, 4, DATA),
            CCW1(css.CCW_CMD_TIC, 0, 0, PROGRAM + 24), CCW1(0xFF, 0, 0, 0),
            CCW1(css.CCW_CMD_NOOP, css.CCW_FLAG_CC, 0, 0), CCW1(css.CCW_CMD_WRITE, 0, 4, DATA + 4))
    cc, irb = start(dev)
    assert cc is IOInstEnding.CC_EXPECTED and irb.scsw.dstat == CE_DE and irb.scsw.cpa == PROGRAM + 40
    assert fake.model.store[:8] == b"ABCDEFGH"


def test_the_interrupt_carries_the_orbs_parameter_and_the_guests_isc(dev):
    before = len(dev.css.io_interrupts)
    start(dev, CCW1(css.CCW_CMD_NOOP, 0, 0, 0), intparm=0xFEEDF00D)
    interrupt = dev.css.io_interrupts[before]
    assert (interrupt.io_int_parm, interrupt.isc, interrupt.subchannel_nr) == (0xFEEDF00D, 3, dev.sch.schid)


@pytest.mark.parametrize("ret_code, cc, unit_exception", [
    (0, IOInstEnding.CC_EXPECTED, False),
    (-errno.EBUSY, IOInstEnding.CC_BUSY, False),
    (-errno.ENODEV, IOInstEnding.CC_NOT_OPERATIONAL, False),
    (-errno.EACCES, IOInstEnding.CC_NOT_OPERATIONAL, False),
    (-errno.EFAULT, IOInstEnding.CC_EXPECTED, True),
    (-OTHER_ERRNO, IOInstEnding.CC_EXPECTED, True),
])
def test_each_ret_code_of_a_start_becomes_a_condition_code(dev, fake, ret_code, cc, unit_exception):
    fake.plan("io-write", ret_code=ret_code)
    before = len(dev.css.io_interrupts)
    with TraceRecorder() as rec:
        assert dev.sch.ssch(orb()) is cc
    errors = messages(rec, "error")
    if unit_exception:
        assert_unit_exception(dev, before)
    else:
        assert len(dev.css.io_interrupts) == before
    if cc is not IOInstEnding.CC_EXPECTED:
        assert dev.sch.scsw.ctrl == 0, "a refused start left the SCSW changed"
    assert errors == ([f"vfio-ccw: write I/O region failed with errno={-ret_code}"] if ret_code else [])


def test_a_start_retries_after_eagain(dev, fake):
    fake.plan("io-write", errno=errno.EAGAIN)
    with TraceRecorder() as rec:
        cc, irb = start(dev, CCW1(css.CCW_CMD_NOOP, 0, 0, 0))
    assert cc is IOInstEnding.CC_EXPECTED and irb.scsw.dstat == CE_DE
    assert len(rec.named("vfio_ccw_write_retry")) == 1 and not rec.named("error")
    assert len(fake.requests) == 1


def test_a_short_write_of_the_io_region_is_a_unit_exception(dev, fake):
    fake.plan("io-write", count=uapi.ccw_io_region.size - 4)
    before = len(dev.css.io_interrupts)
    with TraceRecorder() as rec:
        assert dev.sch.ssch(orb()) is IOInstEnding.CC_EXPECTED
    assert_unit_exception(dev, before)
    assert messages(rec, "error") == ["vfio-ccw: write I/O region failed with errno=0"] and not fake.requests


def test_a_start_while_the_kernel_still_runs_one_is_busy(dev, fake):
    """The guest's own css would answer busy first; the request goes to the kernel regardless."""
    fake.subchannel.hold = True
    program(dev, CCW1(css.CCW_CMD_NOOP, 0, 0, 0))
    assert dev.sch.ssch(orb()) is IOInstEnding.CC_EXPECTED
    assert dev.handle_request() is IOInstEnding.CC_BUSY
    before = len(dev.css.io_interrupts)
    fake.subchannel.finish()
    assert interrupted(dev, before) and dev.sch.tsch()[1].scsw.dstat == CE_DE


def test_a_start_with_no_path_available_is_not_operational(dev, fake):
    fake.subchannel.schib.pmcw.pam = 0
    assert dev.sch.ssch(orb()) is IOInstEnding.CC_NOT_OPERATIONAL


def test_a_channel_program_in_unmapped_memory_is_a_unit_exception(dev):
    before = len(dev.css.io_interrupts)
    assert dev.sch.ssch(orb(cpa=RAM + RAM_SIZE + 0x100)) is IOInstEnding.CC_EXPECTED
    assert_unit_exception(dev, before)


def test_a_transport_mode_orb_is_a_unit_exception(dev):
    before = len(dev.css.io_interrupts)
    assert dev.sch.ssch(orb(ctrl0=FMT_PFCH | css.ORB_CTRL0_MASK_INVALID)) is IOInstEnding.CC_EXPECTED
    assert_unit_exception(dev, before)


# -- PFCH --------------------------------------------------------------------------------------
def test_an_orb_without_pfch_is_refused_with_a_unit_exception(dev, fake):
    before = len(dev.css.io_interrupts)
    with TraceRecorder() as rec:
        assert dev.sch.ssch(orb(ctrl0=css.ORB_CTRL0_MASK_FMT)) is IOInstEnding.CC_EXPECTED
    assert_unit_exception(dev, before)
    assert messages(rec, "warning") == ["vfio-ccw (devno fe.0.0000): requires PFCH flag set"]
    assert not fake.requests, "the kernel saw a request QEMU refuses"


def test_the_pfch_warning_comes_once(dev):
    with TraceRecorder() as rec:
        for _ in range(3):
            dev.sch.ssch(orb(ctrl0=css.ORB_CTRL0_MASK_FMT))
            dev.sch.tsch()
    assert len(rec.named("warning")) == 1 and dev.warned_orb_pfch


def test_force_orb_pfch_sets_the_flag_and_warns_once(realize, fake):
    d = realize(force_orb_pfch=True)
    enable(d)
    with TraceRecorder() as rec:
        for _ in range(2):
            cc, irb = start(d, CCW1(css.CCW_CMD_NOOP, 0, 0, 0), ctrl0=css.ORB_CTRL0_MASK_FMT)
            assert cc is IOInstEnding.CC_EXPECTED and irb.scsw.dstat == CE_DE
    assert messages(rec, "warning") == ["vfio-ccw (devno fe.0.0000): PFCH flag forced"]
    assert all(r.ctrl0 & css.ORB_CTRL0_MASK_PFCH for r in fake.requests) and len(fake.requests) == 2


# -- halt and clear ---------------------------------------------------------------------------
HALT_OK = (0, -errno.EBUSY, -errno.ENODEV, -errno.EACCES)
CLEAR_OK = (0, -errno.ENODEV, -errno.EACCES)


@pytest.mark.parametrize("function, ret_code", [
    *(("halt", r) for r in (*HALT_OK, -errno.EFAULT, -OTHER_ERRNO)),
    *(("clear", r) for r in (*CLEAR_OK, -errno.EBUSY, -errno.EFAULT, -OTHER_ERRNO)),
])
def test_each_ret_code_of_halt_and_clear(dev, fake, function, ret_code):
    fake.plan("async-write", ret_code=ret_code)
    before = len(dev.css.io_interrupts)
    assert getattr(dev, f"handle_{function}")() == 0
    if ret_code in (HALT_OK if function == "halt" else CLEAR_OK):
        assert len(dev.css.io_interrupts) == before and dev.sch.scsw.dstat == 0
    else:
        assert_unit_exception(dev, before)


@pytest.mark.parametrize("function", ["halt", "clear"])
def test_halt_and_clear_retry_after_eagain(dev, fake, function):
    fake.plan("async-write", errno=errno.EAGAIN)
    before = len(dev.css.io_interrupts)
    with TraceRecorder() as rec:
        assert getattr(dev, f"handle_{function}")() == 0
    assert len(rec.named("vfio_ccw_write_retry")) == 1
    assert interrupted(dev, before), "the kernel's halt or clear never interrupted"
    function_bit = {"halt": css.SCSW_FCTL_HALT_FUNC, "clear": css.SCSW_FCTL_CLEAR_FUNC}[function]
    assert dev.sch.scsw.ctrl & css.SCSW_CTRL_MASK_FCTL == function_bit


def test_a_halt_ends_a_start_the_device_still_holds(dev, fake):
    fake.subchannel.hold = True
    program(dev, CCW1(css.CCW_CMD_NOOP, 0, 0, 0))
    assert dev.sch.ssch(orb()) is IOInstEnding.CC_EXPECTED
    before = len(dev.css.io_interrupts)
    assert dev.sch.hsch() is IOInstEnding.CC_EXPECTED
    assert interrupted(dev, before)
    cc, irb = dev.sch.tsch()
    assert irb.scsw.ctrl & css.SCSW_CTRL_MASK_FCTL == css.SCSW_FCTL_START_FUNC | css.SCSW_FCTL_HALT_FUNC
    assert fake.subchannel.programs == 0


def test_without_the_async_region_halt_and_clear_are_emulated(realize, fake_kernel):
    d = realize(sysfsdev=mdev(ONLY_IO))
    enable(d)
    fake = fake_kernel.ccw_device(ONLY_IO)
    assert d.handle_halt() == -errno.ENOSYS and d.handle_clear() == -errno.ENOSYS
    before = len(d.css.io_interrupts)
    assert d.sch.csch() is IOInstEnding.CC_EXPECTED
    assert len(d.css.io_interrupts) == before + 1 and not fake.subchannel.status
    cc, irb = d.sch.tsch()
    assert irb.scsw.ctrl == css.SCSW_FCTL_CLEAR_FUNC | css.SCSW_STCTL_STATUS_PEND


# -- the I/O interrupt ------------------------------------------------------------------------
def test_a_unit_check_copies_the_sense_data_with_concurrent_sense(dev, fake):
    cc, irb = start(dev, CCW1(0x17, 0, 8, BUFFER))
    assert irb.scsw.dstat == CE_DE | css.SCSW_DSTAT_UNIT_CHECK
    assert irb.ecw[0] == 0x80, "the command reject did not reach the guest's IRB"
    assert not any(dev.sch.sense_data), "tsch left the sense data behind"


def test_without_concurrent_sense_the_sense_data_is_not_copied(realize, fake_kernel):
    d = realize()
    enable(d, csense=False)
    with TraceRecorder() as rec:
        cc, irb = start(d, CCW1(0x17, 0, 8, BUFFER))
    assert irb.scsw.dstat == CE_DE | css.SCSW_DSTAT_UNIT_CHECK and not any(irb.ecw)
    assert rec.named("vfio_region_read"), "the IRB was not read from the I/O region"
    assert not any(d.sch.sense_data)


@pytest.mark.parametrize("code, cstat", [(errno.EFAULT, css.SCSW_CSTAT_DATA_CHECK),
                                         (OTHER_ERRNO, css.SCSW_CSTAT_PROG_CHECK),
                                         (errno.EINVAL, css.SCSW_CSTAT_PROG_CHECK)])
def test_a_failed_irb_read_is_a_channel_check(dev, fake, code, cstat):
    fake.plan("io-read", errno=code)
    before = len(dev.css.io_interrupts)
    assert dev.sch.ssch(orb()) is IOInstEnding.CC_EXPECTED
    assert interrupted(dev, before)
    scsw = dev.sch.scsw
    assert scsw.cstat == cstat and scsw.ctrl & css.SCSW_CTRL_MASK_STCTL == CHANNEL_CHECK
    assert not scsw.ctrl & css.SCSW_ACTL_START_PEND and scsw.ctrl & css.SCSW_FCTL_START_FUNC


def test_a_short_irb_read_is_a_channel_control_check(dev, fake):
    fake.plan("io-read", count=uapi.ccw_io_region.size // 2)
    before = len(dev.css.io_interrupts)
    dev.sch.ssch(orb())
    assert interrupted(dev, before)
    assert dev.sch.scsw.cstat == css.SCSW_CSTAT_CHN_CTRL_CHK
    assert dev.sch.scsw.ctrl & css.SCSW_CTRL_MASK_STCTL == CHANNEL_CHECK


def test_enodev_reading_the_irb_is_a_deferred_cc_3(dev, fake):
    fake.plan("io-read", errno=errno.ENODEV)
    before = len(dev.css.io_interrupts)
    dev.sch.ssch(orb())
    assert interrupted(dev, before)
    scsw = dev.sch.scsw
    assert scsw.cc == 3 and scsw.ctrl & css.SCSW_CTRL_MASK_STCTL == css.SCSW_STCTL_ALERT | css.SCSW_STCTL_STATUS_PEND
    assert scsw.ctrl & css.SCSW_ACTL_START_PEND and scsw.cstat == 0


def test_a_wakeup_with_nothing_signalled_injects_nothing(dev):
    handler = dev.machine.fd_handlers[dev.notifiers[uapi.VFIO_CCW_IO_IRQ_INDEX]]
    handler()
    assert dev.css.io_interrupts == []


# -- store subchannel and channel reports -----------------------------------------------------
def test_store_subchannel_takes_the_path_bits_from_the_schib_region(dev, fake):
    start(dev, CCW1(css.CCW_CMD_NOOP, 0, 0, 0))
    fake.chp_event(0x11, ChpEvent.OFFLINE)
    fake.subchannel.schib.scsw.flags |= css.SCSW_FLAGS_MASK_PNO
    cc, schib = dev.sch.stsch()
    assert cc is IOInstEnding.CC_EXPECTED
    assert (schib.pmcw.pam, schib.pmcw.lpum, schib.pmcw.pom) == (0, 0x80, 0xFF)
    assert schib.scsw.flags & css.SCSW_FLAGS_MASK_PNO and schib.pmcw.intparm == 0x1234


def test_a_failed_schib_read_is_reported_and_changes_nothing(dev, fake):
    fake.plan("schib-read", errno=errno.ENODEV)
    fake.subchannel.schib.pmcw.pam = 0
    with TraceRecorder() as rec:
        cc, schib = dev.sch.stsch()
    assert cc is IOInstEnding.CC_EXPECTED and schib.pmcw.pam == 0x80
    assert messages(rec, "error") == ["vfio-ccw: store region read failed with errno=19"]


def test_without_a_schib_region_store_subchannel_reads_nothing(realize, fake_kernel):
    d = realize(sysfsdev=mdev(ONLY_IO))
    fake_kernel.ccw_device(ONLY_IO).subchannel.schib.pmcw.pam = 0
    with TraceRecorder() as rec:
        cc, schib = d.sch.stsch()
    assert cc is IOInstEnding.CC_EXPECTED and schib.pmcw.pam == 0x80 and not rec.named("vfio_region_read")


def test_a_channel_path_going_offline_queues_its_crw_for_the_guest(dev, fake):
    fake.chp_event(0x11, ChpEvent.OFFLINE)
    assert dev.machine.run_until(lambda: dev.css.pending_crws, WAIT), "no CRW reached the guest"
    crw = dev.css.stcrw()
    assert (crw.rsc, crw.erc, crw.rsid) == (css.CRW_RSC_CHP, css.CRW_ERC_PERRN, 0x11)
    assert dev.css.crw_mchks == 1 and dev.css.stcrw() is None and dev.css.do_crw_mchk


def test_every_queued_crw_is_read_in_order(dev, fake):
    fake.chp_event(0x11, ChpEvent.OFFLINE)
    fake.chp_event(0x11, ChpEvent.ONLINE)
    assert dev.machine.run_until(lambda: len(dev.css.pending_crws) == 2, WAIT)
    assert [c.erc for c in dev.css.pending_crws] == [css.CRW_ERC_PERRN, css.CRW_ERC_INIT]
    assert dev.css.crw_mchks == 1 and not fake.crws


def test_a_failed_crw_read_is_reported_and_queues_nothing(dev, fake):
    fake.plan("crw-read", errno=errno.EFAULT)
    with TraceRecorder() as rec:
        fake.chp_event(0x11, ChpEvent.OFFLINE)
        assert dev.machine.run_until(lambda: rec.named("error"), WAIT)
    assert messages(rec, "error") == ["vfio-ccw: Read crw region failed with errno=14"]
    assert not dev.css.pending_crws


# -- reset, options, unrealize ----------------------------------------------------------------
def test_reset_is_vfio_device_reset(dev, fake):
    resets = fake.resets
    dev.reset()
    dev.compute_needs_reset()
    assert fake.resets == resets + 1 and not dev.needs_reset
    cc, irb = start(dev, CCW1(css.CCW_CMD_NOOP, 0, 0, 0))
    assert irb.scsw.dstat == CE_DE, "the subchannel did not work after the reset"


def test_an_option_string_sets_the_properties(realize, vfio):
    d = realize()
    with VFIOCCWDevice.from_options(AddressSpace(vfio.host, d.machine), d.machine,
                                    f"sysfsdev={mdev(ONLY_IO)},force-orb-pfch=on", css=d.css) as other:
        assert (other.name, other.force_orb_pfch, d.force_orb_pfch) == (ONLY_IO, True, False)


@pytest.mark.parametrize("option, message", [
    ("force-orb-pfch=maybe", "Parameter 'force-orb-pfch' expects 'on' or 'off'"),
    ("devno=fe.0.0001", "Property 'vfio-ccw.devno' not found"),
])
def test_a_bad_option_is_refused_before_anything_opens(vfio, fake_kernel, option, message):
    machine = Machine(VirtualClock())
    with pytest.raises(VFIOError) as e:
        VFIOCCWDevice.from_options(AddressSpace(vfio.host, machine), machine, f"sysfsdev={MDEV},{option}")
    machine.close()
    assert e.value.message == message and fake_kernel.open_files() == {}


def test_unrealize_tears_the_notifiers_down_and_releases_everything(realize, fake_kernel, fake):
    d = realize()
    before = len(fake.set_irqs_log)
    d.unrealize()
    trigger_eventfd = uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_TRIGGER
    assert fake.set_irqs_log[before:] == [(1, trigger_eventfd, 0, 1), (0, trigger_eventfd, 0, 1)]
    assert all(ctx.trigger is None for ctx in fake.irqs)
    assert fake_kernel.open_files() == {} and not d.machine.fd_handlers
    assert not d.space.groups and not d.css.subchannels and d.vbasedev is None
    d.unrealize()
