"""The vfio-platform flavour on the fake's platform devices: realize and each of its errors, the
regions and their mmap fast path, IRQs through the user-space handler (one ACTIVE, the rest
queued in order, EOI by trapped access, automasked ones unmasked through SET_IRQS), through the
machine's irqfd with a resample eventfd, and the mmap timer on the virtual clock."""

import errno

import pytest

from vfio_impl import uapi
from vfio_impl.core.container import AddressSpace
from vfio_impl.core.errors import VFIOError
from vfio_impl.core.trace import TraceRecorder
from vfio_impl.flavours.platform import IRQState, VFIOPlatformDevice
from vfio_impl.vmm.machine import Machine, VirtualClock

from ..raw import assert_fast_path_back_after

pytestmark = pytest.mark.vfio(platform=True)

NAME = "c0000000.platform-test"
SYSFS = f"/sys/bus/platform/devices/{NAME}"
COMPAT = "qemu,platform-test\0vfio,test-device\0"
REGS, RAM = 0, 1
ID, RAISE, LOWER, LEVEL, SCRATCH, RESET_COUNT = 0x00, 0x04, 0x08, 0x0C, 0x10, 0x14
ID_VALUE = 0x54414C50
# Both level IRQs are automasked, as vfio-platform makes every level-triggered line.
LEVEL_AUTOMASKED, EDGE, LEVEL_2 = 0, 1, 2
WAIT = 2.0
TRIGGER_EVENTFD = uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_TRIGGER
UNMASK_EVENTFD = uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_UNMASK
UNMASK_IOCTL = uapi.VFIO_IRQ_SET_DATA_NONE | uapi.VFIO_IRQ_SET_ACTION_UNMASK


class FailingHost:
    """The backend's host with one kind of call refused, as a kernel out of resources or one
    that rejects a request would answer. `ioctl` maps (request, index) to an errno."""

    def __init__(self, host, *, ioctl=None, eventfd_after=None, mmap=None, readlink=None):
        self._host = host
        self._ioctl = ioctl or {}
        self._eventfd_after = eventfd_after
        self._mmap = mmap
        self._readlink = readlink
        self.eventfds = 0

    def __getattr__(self, name):
        return getattr(self._host, name)

    def ioctl(self, fd, request, arg=0):
        if request in (uapi.VFIO_DEVICE_GET_REGION_INFO, uapi.VFIO_DEVICE_GET_IRQ_INFO,
                       uapi.VFIO_DEVICE_SET_IRQS):
            index = int.from_bytes(bytes(arg[8:12]), "little")
            flags = int.from_bytes(bytes(arg[4:8]), "little")
            for key in ((request, index), (request, index, flags)):
                if key in self._ioctl:
                    raise OSError(self._ioctl[key], "refused by the test")
        return self._host.ioctl(fd, request, arg)

    def eventfd(self):
        if self._eventfd_after is not None and self.eventfds >= self._eventfd_after:
            raise OSError(errno.EMFILE, "too many open files")
        self.eventfds += 1
        return self._host.eventfd()

    def mmap(self, fd, length, offset, prot=None):
        if self._mmap:
            raise OSError(self._mmap, "refused by the test")
        return self._host.mmap(fd, length, offset, *(() if prot is None else (prot,)))

    def readlink(self, path):
        return self._readlink(path) if self._readlink else self._host.readlink(path)


@pytest.fixture
def realize(vfio):
    """A factory: realize on a fresh machine on a virtual clock (one that plays KVM with
    irqfd=True) through the backend's host, or `via` a wrapper of it; everything realized is
    torn down after the test, and must have put its group back."""
    made = []

    def realize_platform(via=None, irqfd=False, **options):
        machine = Machine(VirtualClock(), irqfd=irqfd)
        space = AddressSpace(via or vfio.host, machine)
        made.append([space, None])
        options.setdefault("host", NAME)
        made[-1][1] = VFIOPlatformDevice.realize(space, machine, **options)
        return made[-1][1]

    yield realize_platform
    for space, dev in reversed(made):
        if dev:
            dev.exit()
        assert not space.groups, "the device left its group open"
        space.machine.close()


@pytest.fixture
def dev(realize):
    """platform-test with its three IRQs on guest lines, injected from user space."""
    d = realize()
    for i in range(3):
        d.connect_irq(i, f"spi {32 + i}")
    return d


@pytest.fixture
def fake(fake_kernel):
    return fake_kernel.platform_device(NAME)


def realize_error(realize, **options):
    with pytest.raises(VFIOError) as e:
        realize(**options)
    return e.value


def raise_irq(d, pin: int) -> None:
    """The device asserts line `pin` (a trapped write, so also an EOI) and the loop delivers it."""
    intp = d.irqs[pin]
    before = intp.line.raised
    d.mmio_write(REGS, RAISE, 1 << pin, 4)
    assert d.machine.run_until(lambda: intp.line.raised > before or intp.state is IRQState.PENDING, WAIT), \
        f"IRQ {pin} never reached the machine"


def trigger(d, pin: int) -> None:
    """VFIO's loopback trigger: the kernel signals the eventfd with no MMIO access (no EOI)."""
    d.vbasedev.trigger_irq(pin)
    intp = d.irqs[pin]
    assert d.machine.run_until(lambda: intp.state is not IRQState.INACTIVE, WAIT), f"IRQ {pin} never fired"


def interrupts(recorder: TraceRecorder, pin: int) -> int:
    return sum(1 for f in recorder.named("vfio_platform_intp_interrupt") if f["pin"] == pin)


def settle(d) -> None:
    """A bounded wait for anything that should not come: the loop runs until WAIT/10 passes."""
    d.machine.run_until(lambda: False, WAIT / 10)


# -- realize ----------------------------------------------------------------------------------
def test_realize_by_host_names_the_sysfs_device_and_reads_every_region_and_irq(realize):
    d = realize()
    assert d.name == NAME and d.sysfsdev == SYSFS
    assert [r.size for r in d.regions] == [0x1000, 0x2000]
    assert [i.pin for i in d.irqs] == [0, 1, 2]
    assert [i.automasked for i in d.irqs] == [True, False, True]
    assert all(i.state is IRQState.INACTIVE and not i.kvm_accel for i in d.irqs)
    assert d.irqs[0].unmask >= 0 and d.irqs[2].unmask >= 0 and d.irqs[EDGE].unmask == -1
    assert d.mmio_read(REGS, ID, 4) == ID_VALUE


def test_sysfsdev_takes_precedence_over_host(realize):
    d = realize(host="not/this", sysfsdev=SYSFS + "/")
    assert d.name == NAME and d.mmio_read(REGS, ID, 4) == ID_VALUE


def test_the_compatible_list_of_the_of_node_is_counted(realize):
    d = realize()
    assert d.compat == COMPAT and d.num_compat == 2


def test_a_given_compat_is_not_read_from_sysfs(realize):
    d = realize(host="c4000000.no-of-node", compat="acme,one\0acme,two\0acme,three\0")
    assert d.num_compat == 3 and d.name == "c4000000.no-of-node"


def test_no_host_is_a_wrong_host_name_with_no_device_name(realize):
    e = realize_error(realize, host=None)
    assert e.message == "vfio error: wrong host device name" and e.errno == errno.EINVAL


def test_a_host_name_with_a_slash_is_wrong(realize):
    e = realize_error(realize, host="bus/c0000000.platform-test")
    assert e.message == "vfio bus/c0000000.platform-test: wrong host device name" and e.errno == errno.EINVAL


def test_a_missing_sysfs_device(realize):
    e = realize_error(realize, host="d0000000.nothing")
    assert e.message == "vfio d0000000.nothing: failed to get the sysfs host device file status"
    assert e.errno == errno.ENOENT


def test_a_device_with_no_iommu_group(realize):
    e = realize_error(realize, host="c1000000.no-group")
    assert e.message == "vfio c1000000.no-group: no iommu_group found" and e.errno == errno.ENOENT


def test_an_iommu_group_link_that_does_not_fill_path_max(vfio, realize):
    long_link = "../../" + "x" * 4096 + "/20"
    e = realize_error(realize, via=FailingHost(vfio.host, readlink=lambda path: long_link))
    assert e.message == f"vfio {NAME}: no iommu_group found" and e.errno == errno.ENAMETOOLONG


def test_an_iommu_group_whose_name_is_not_a_number(vfio, realize):
    link = vfio.host.readlink("/sys/bus/platform/devices/c2000000.bad-group/iommu_group")
    e = realize_error(realize, host="c2000000.bad-group")
    assert e.message == f"vfio c2000000.bad-group: failed to read {link}" and e.errno == errno.EINVAL


def test_a_device_without_the_platform_flag_is_refused_and_its_group_put_back(realize, fake_kernel):
    e = realize_error(realize, host="c3000000.not-platform")
    assert e.message == "vfio c3000000.not-platform: this isn't a platform device"
    assert fake_kernel.open_files() == {}


def test_a_device_already_attached_is_busy(realize):
    first = realize()
    with pytest.raises(VFIOError) as e:
        VFIOPlatformDevice.realize(first.space, first.machine, host=NAME)
    assert e.value.message == f"vfio {NAME}: device is already attached" and e.value.errno == errno.EBUSY
    assert first.vbasedev.group.fd >= 0 and first.mmio_read(REGS, ID, 4) == ID_VALUE


def test_a_missing_of_node_unwinds_the_whole_device(realize, fake_kernel):
    e = realize_error(realize, host="c4000000.no-of-node")
    path = "/sys/bus/platform/devices/c4000000.no-of-node/of_node/compatible"
    assert e.message == f"vfio c4000000.no-of-node: Failed to open file \u201c{path}\u201d"
    assert e.errno == errno.ENOENT and fake_kernel.open_files() == {}


def test_a_region_info_failure_unwinds(vfio, realize, fake_kernel):
    host = FailingHost(vfio.host, ioctl={(uapi.VFIO_DEVICE_GET_REGION_INFO, 1): errno.EFAULT})
    e = realize_error(realize, via=host)
    assert e.message == f"vfio {NAME}: failed to get region 1 info" and e.errno == errno.EFAULT
    assert host.eventfds == 0 and fake_kernel.open_files() == {}


def test_an_irq_info_failure_unwinds_the_irqs_then_the_regions(vfio, realize, fake_kernel):
    host = FailingHost(vfio.host, ioctl={(uapi.VFIO_DEVICE_GET_IRQ_INFO, 2): errno.EINVAL})
    with TraceRecorder() as rec:
        e = realize_error(realize, via=host)
    assert e.message == f"vfio {NAME}: failed to get device irq info" and e.errno == errno.EINVAL
    assert host.eventfds == 3 and fake_kernel.open_files() == {}
    assert [f["pin"] for f in rec.named("vfio_platform_populate_interrupts")] == [0, 1]


def test_a_trigger_eventfd_failure(vfio, realize, fake_kernel):
    e = realize_error(realize, via=FailingHost(vfio.host, eventfd_after=2))
    assert e.message == f"vfio {NAME}: failed to initialize trigger eventfd notifier" and e.errno == errno.EMFILE
    assert fake_kernel.open_files() == {}


def test_a_resample_eventfd_failure(vfio, realize, fake_kernel):
    e = realize_error(realize, via=FailingHost(vfio.host, eventfd_after=1))
    assert e.message == f"vfio {NAME}: failed to initialize resample eventfd notifier"
    assert e.errno == errno.EMFILE and fake_kernel.open_files() == {}


# -- regions and the fast path ----------------------------------------------------------------
def test_both_page_sized_regions_are_mmapped_and_the_fast_path_does_not_trap(realize):
    d = realize()
    assert d.regions[REGS].areas and d.regions[RAM].areas and d.mmap_enabled()
    with TraceRecorder() as rec:
        d.mmio_write(RAM, 0x100, 0xCAFEF00D, 4)
        assert d.mmio_read(RAM, 0x100, 4) == 0xCAFEF00D
        d.mmio_write(REGS, SCRATCH, 0x12345678, 4)
        assert d.mmio_read(REGS, SCRATCH, 4) == 0x12345678
    assert not rec.named("vfio_region_read") and not rec.named("vfio_region_write")
    assert int.from_bytes(d.regions[RAM].pread(0x100, 4), "little") == 0xCAFEF00D
    assert int.from_bytes(d.regions[REGS].pread(SCRATCH, 4), "little") == 0x12345678


def test_x_no_mmap_traps_every_access(realize):
    d = realize(x_no_mmap=True)
    assert not any(r.areas for r in d.regions) and not d.mmap_enabled()
    with TraceRecorder() as rec:
        d.mmio_write(RAM, 8, 0x55AA, 2)
        assert d.mmio_read(RAM, 8, 2) == 0x55AA
    assert rec.named("vfio_region_read") and rec.named("vfio_region_write")


def test_a_failed_mmap_warns_and_the_region_still_works(vfio, realize):
    with TraceRecorder() as rec:
        d = realize(via=FailingHost(vfio.host, mmap=errno.ENOMEM))
    assert [f["message"] for f in rec.named("warning")] == \
        [f"VFIO {NAME} region {i} mmap unsupported, performance may be slow" for i in (REGS, RAM)]
    d.mmio_write(RAM, 0, 7, 4)
    assert d.mmio_read(RAM, 0, 4) == 7 and not d.mmap_enabled()


# -- interrupts from user space ---------------------------------------------------------------
def test_an_edge_irq_asserts_its_line_and_turns_the_fast_path_off(dev):
    intp = dev.irqs[EDGE]
    raise_irq(dev, EDGE)
    assert intp.state is IRQState.ACTIVE and intp.line.history == [True]
    assert not dev.mmap_enabled() and dev.mmap_timer.deadline == 1100


def test_the_first_trapped_access_is_the_eoi(dev):
    intp = dev.irqs[EDGE]
    raise_irq(dev, EDGE)
    assert dev.mmio_read(REGS, ID, 4) == ID_VALUE
    assert intp.state is IRQState.INACTIVE and intp.line.history == [True, False]


def test_while_an_irq_is_active_the_ram_region_traps_too_and_ends_it(dev):
    raise_irq(dev, EDGE)
    with TraceRecorder() as rec:
        dev.mmio_read(RAM, 0, 4)
    assert rec.named("vfio_region_read") and rec.named("vfio_platform_eoi")
    assert dev.irqs[EDGE].state is IRQState.INACTIVE


def test_an_automasked_irq_is_masked_until_the_eoi_unmasks_it_through_set_irqs(dev, fake):
    rec = TraceRecorder()
    with rec:
        raise_irq(dev, LEVEL_AUTOMASKED)
        assert fake.irq_masked(LEVEL_AUTOMASKED) and fake.line(LEVEL_AUTOMASKED)
        settle(dev)
        assert interrupts(rec, LEVEL_AUTOMASKED) == 1, "a masked IRQ fired again"
        log_before = len(fake.set_irqs_log)
        assert dev.mmio_read(REGS, LEVEL, 4) & 1
        assert (LEVEL_AUTOMASKED, UNMASK_IOCTL, 0, 1) in fake.set_irqs_log[log_before:]
        assert dev.machine.run_until(lambda: interrupts(rec, LEVEL_AUTOMASKED) == 2, WAIT), \
            "the UNMASK of a still-asserted line did not fire it again"
    assert dev.irqs[LEVEL_AUTOMASKED].line.history == [True, False, True]


def test_lowering_the_line_as_the_eoi_ends_the_level_irq(dev, fake):
    with TraceRecorder() as rec:
        raise_irq(dev, LEVEL_AUTOMASKED)
        dev.mmio_write(REGS, LOWER, 1 << LEVEL_AUTOMASKED, 4)
        settle(dev)
    assert not fake.irq_masked(LEVEL_AUTOMASKED) and not fake.line(LEVEL_AUTOMASKED)
    assert interrupts(rec, LEVEL_AUTOMASKED) == 1 and not dev.irqs[LEVEL_AUTOMASKED].line.level


def test_an_irq_that_is_not_automasked_is_not_unmasked(dev, fake):
    raise_irq(dev, EDGE)
    before = len(fake.set_irqs_log)
    dev.mmio_read(REGS, ID, 4)
    assert dev.irqs[EDGE].state is IRQState.INACTIVE
    assert not [c for c in fake.set_irqs_log[before:] if c[1] == UNMASK_IOCTL]


def test_irqs_firing_while_one_is_active_wait_in_fifo_order(dev):
    edge, plain, masked = dev.irqs[EDGE], dev.irqs[LEVEL_2], dev.irqs[LEVEL_AUTOMASKED]
    raise_irq(dev, EDGE)
    trigger(dev, LEVEL_2)
    trigger(dev, LEVEL_AUTOMASKED)
    assert [plain.state, masked.state] == [IRQState.PENDING, IRQState.PENDING]
    assert list(dev.pending_intp_queue) == [plain, masked]
    assert not plain.line.level and not masked.line.level
    dev.mmio_read(REGS, ID, 4)
    assert edge.state is IRQState.INACTIVE and plain.state is IRQState.ACTIVE and plain.line.level
    assert list(dev.pending_intp_queue) == [masked] and not masked.line.level
    dev.mmio_read(REGS, ID, 4)
    assert plain.state is IRQState.INACTIVE and masked.state is IRQState.ACTIVE and masked.line.level
    dev.mmio_read(REGS, ID, 4)
    assert all(i.state is IRQState.INACTIVE for i in dev.irqs) and not dev.pending_intp_queue
    assert [i.line.history for i in dev.irqs] == [[True, False]] * 3


def test_a_pending_irq_is_cleared_and_not_delivered_twice(dev):
    raise_irq(dev, EDGE)
    trigger(dev, LEVEL_2)
    with TraceRecorder() as rec:
        settle(dev)
    assert not rec.named("vfio_platform_intp_interrupt") and not rec.named("vfio_intp_interrupt_set_pending")
    assert list(dev.pending_intp_queue) == [dev.irqs[LEVEL_2]]


def test_the_active_irq_firing_again_stays_active_and_is_not_queued(dev):
    raise_irq(dev, EDGE)
    with TraceRecorder() as rec:
        dev.vbasedev.trigger_irq(EDGE)
        assert dev.machine.run_until(lambda: rec.named("vfio_platform_intp_interrupt")
                                     or rec.named("vfio_intp_interrupt_set_pending"), WAIT)
    assert not rec.named("vfio_intp_interrupt_set_pending") and not dev.pending_intp_queue
    assert dev.irqs[EDGE].state is IRQState.ACTIVE and dev.irqs[EDGE].line.history == [True]


def test_a_wakeup_with_nothing_to_clear_is_reported(dev):
    intp = dev.irqs[EDGE]
    handler = dev.machine.fd_handlers[intp.interrupt]
    with TraceRecorder() as rec:
        handler()
    assert [f["message"] for f in rec.named("error")] == [f"Error when clearing fd={intp.interrupt} (ret = 0)"]
    assert intp.state is IRQState.ACTIVE and intp.line.level


def test_a_refused_trigger_eventfd_aborts_connect_with_the_handler_removed(vfio, realize):
    host = FailingHost(vfio.host, ioctl={(uapi.VFIO_DEVICE_SET_IRQS, EDGE, TRIGGER_EVENTFD): errno.EINVAL})
    d = realize(via=host)
    with pytest.raises(VFIOError) as e:
        d.connect_irq(EDGE, "spi 33")
    assert e.value.message == f"vfio {NAME}: vfio: failed to set signaling of irq {EDGE}.0"
    assert e.value.errno == errno.EINVAL and not d.machine.has_fd_handler(d.irqs[EDGE].interrupt)


# -- the irqfd path ---------------------------------------------------------------------------
def test_with_irqfd_the_trigger_goes_to_kvm_and_the_resample_fd_to_vfio(realize, fake):
    d = realize(irqfd=True)
    before = len(fake.set_irqs_log)
    d.connect_irq(LEVEL_AUTOMASKED, "spi 32")
    intp = d.irqs[LEVEL_AUTOMASKED]
    assert intp.kvm_accel and d.machine.irqfds[intp.interrupt].resample == intp.unmask
    assert not d.machine.has_fd_handler(intp.interrupt)
    assert fake.set_irqs_log[before:] == [(LEVEL_AUTOMASKED, TRIGGER_EVENTFD, 0, 1),
                                          (LEVEL_AUTOMASKED, UNMASK_EVENTFD, 0, 1)]


def test_with_irqfd_the_guest_eoi_writes_the_resample_fd_which_unmasks(realize, fake):
    d = realize(irqfd=True)
    line = d.connect_irq(LEVEL_AUTOMASKED, "spi 32")
    d.mmio_write(REGS, RAISE, 1 << LEVEL_AUTOMASKED, 4)
    assert d.machine.run_until(lambda: line.level, WAIT), "KVM's irqfd did not assert the line"
    assert fake.irq_masked(LEVEL_AUTOMASKED) and d.irqs[LEVEL_AUTOMASKED].state is IRQState.INACTIVE
    assert d.mmap_enabled(), "an irqfd interrupt turned the fast path off"
    log_before = len(fake.set_irqs_log)
    assert d.machine.eoi("spi 32") and not line.level
    assert d.machine.run_until(lambda: line.level, WAIT), "the resample did not unmask a still-high line"
    assert fake.set_irqs_log[log_before:] == [], "the unmask went through an ioctl, not the resample fd"
    d.mmio_write(REGS, LOWER, 1 << LEVEL_AUTOMASKED, 4)
    d.machine.eoi("spi 32")
    assert d.machine.run_until(lambda: not fake.irq_masked(LEVEL_AUTOMASKED), WAIT)
    settle(d)
    assert line.history == [True, False, True, False]


def test_with_irqfd_an_edge_irq_has_no_resample_fd(realize, fake):
    d = realize(irqfd=True)
    before = len(fake.set_irqs_log)
    line = d.connect_irq(EDGE, "spi 33")
    assert d.irqs[EDGE].kvm_accel and d.machine.irqfds[d.irqs[EDGE].interrupt].resample is None
    assert fake.set_irqs_log[before:] == [(EDGE, TRIGGER_EVENTFD, 0, 1)]
    d.mmio_write(REGS, RAISE, 1 << EDGE, 4)
    assert d.machine.run_until(lambda: line.history == [True, False], WAIT)


def test_x_irqfd_off_keeps_injection_in_user_space(realize):
    d = realize(irqfd=True, x_irqfd=False)
    d.connect_irq(EDGE, "spi 33")
    intp = d.irqs[EDGE]
    assert not intp.kvm_accel and not d.machine.irqfds and d.machine.has_fd_handler(intp.interrupt)
    raise_irq(d, EDGE)
    assert intp.state is IRQState.ACTIVE


def test_without_irqfd_injection_falls_back_to_user_space(dev):
    machine = dev.machine
    assert not machine.irqfd_available and not machine.irqfds
    assert all(not i.kvm_accel and machine.has_fd_handler(i.interrupt) for i in dev.irqs)


def test_an_irqfd_kvm_refuses_falls_back_to_user_space(realize, monkeypatch):
    def refuse(*args):
        raise OSError(errno.ENOSPC, "no irqfd slots")
    d = realize(irqfd=True)
    monkeypatch.setattr(d.machine, "add_irqfd", refuse)
    d.connect_irq(EDGE, "spi 33")
    assert not d.irqs[EDGE].kvm_accel and d.machine.has_fd_handler(d.irqs[EDGE].interrupt)


def test_a_vfio_failure_after_kvm_took_the_irqfd_removes_it_and_aborts(vfio, realize):
    host = FailingHost(vfio.host, ioctl={(uapi.VFIO_DEVICE_SET_IRQS, LEVEL_AUTOMASKED, UNMASK_EVENTFD): errno.EINVAL})
    d = realize(via=host, irqfd=True)
    with pytest.raises(VFIOError) as e:
        d.connect_irq(LEVEL_AUTOMASKED, "spi 32")
    assert e.value.message == f"vfio {NAME}: vfio: failed to set signaling of irq {LEVEL_AUTOMASKED}.0"
    assert not d.machine.irqfds and not d.irqs[LEVEL_AUTOMASKED].kvm_accel


# -- the mmap timer: virtual time only --------------------------------------------------------
def handled_irq_with_timeout(realize, ms: int):
    """A device with mmap-timeout-ms=ms that has taken and ended one edge interrupt."""
    d = realize(mmap_timeout_ms=ms)
    d.connect_irq(EDGE, "spi 33")
    raise_irq(d, EDGE)
    d.mmio_read(REGS, ID, 4)
    return d


def test_the_fast_path_comes_back_1100_ms_after_the_interrupt(dev):
    raise_irq(dev, EDGE)
    dev.mmio_read(REGS, ID, 4)
    assert_fast_path_back_after(dev, 1100)


def test_the_timer_rearms_while_an_irq_is_active(dev):
    raise_irq(dev, EDGE)
    dev.machine.clock.advance(1100)
    assert not dev.mmap_enabled() and dev.mmap_timer.deadline == 2200
    dev.machine.clock.advance(500)
    dev.mmio_read(REGS, ID, 4)
    assert_fast_path_back_after(dev, 600)


def test_mmap_timeout_ms_sets_the_period(realize):
    assert_fast_path_back_after(handled_irq_with_timeout(realize, 50), 50)


def test_a_zero_timeout_never_arms_the_timer(realize):
    d = handled_irq_with_timeout(realize, 0)
    d.machine.clock.advance(100_000)
    assert not d.mmap_timer.pending and not d.mmap_enabled()


# -- ops, options, teardown -------------------------------------------------------------------
def test_needs_reset_is_always_true_and_the_multi_device_reset_fails(realize):
    d = realize()
    count = d.mmio_read(REGS, RESET_COUNT, 4)
    with TraceRecorder() as rec:
        d.reset()
    assert d.needs_reset and d.migratable is False
    assert [f["message"] for f in rec.named("error")] == \
        [f"vfio {NAME}: multi-device hot reset is not supported: Operation not supported"]
    with pytest.raises(VFIOError) as e:
        d.hot_reset_multi()
    assert e.value.errno == errno.EOPNOTSUPP
    assert d.mmio_read(REGS, RESET_COUNT, 4) == count


def test_an_option_string_sets_the_properties(vfio):
    machine = Machine(VirtualClock())
    space = AddressSpace(vfio.host, machine)
    with VFIOPlatformDevice.from_options(space, machine,
                                         f"host={NAME},x-no-mmap=on,mmap-timeout-ms=7,x-irqfd=off") as d:
        assert (d.name, d.no_mmap, d.mmap_timeout, d.irqfd_allowed) == (NAME, True, 7, False)
        assert not d.mmap_enabled()
    for bad, message in (("x-no-mmap=maybe", "Parameter 'x-no-mmap' expects 'on' or 'off'"),
                         ("mmap-timeout-ms=-1", "Parameter 'mmap-timeout-ms' expects uint32_t"),
                         ("rombar=0", "Property 'vfio-platform.rombar' not found")):
        with pytest.raises(VFIOError) as e:
            VFIOPlatformDevice.from_options(space, machine, f"host={NAME},{bad}")
        assert e.value.message == message
    assert not space.groups
    machine.close()


def test_exit_releases_every_fd_the_irqfds_and_the_group(realize, fake_kernel):
    d = realize(irqfd=True)
    d.connect_irq(LEVEL_AUTOMASKED, "spi 32")
    d.connect_irq(EDGE, "spi 33")
    raise_irq(d, EDGE)
    d.exit()
    assert fake_kernel.open_files() == {} and not d.machine.irqfds and not d.machine.fd_handlers
    assert not d.space.groups and d.vbasedev is None
    d.exit()


def test_connecting_an_irq_the_device_lacks_is_refused(dev):
    with pytest.raises(VFIOError) as e:
        dev.connect_irq(3, "spi 40")
    assert e.value.message == f"vfio {NAME}: no IRQ 3" and e.value.errno == errno.EINVAL
